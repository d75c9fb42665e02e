"""The HTTP gateway: MindSpore Serving's RESTful scheme and the Open Inference Protocol, onto broker requests."""
