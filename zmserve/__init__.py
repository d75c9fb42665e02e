"""zmserve: distributed MindSpore inference over ZeroMQ.

Read a request's path in this order: `zmserve.client` -> `zmserve_services.broker.broker` -> `zmserve_services.worker.worker`
-> `zmserve_services.agent.agent` -> back. The wire format is `zmserve.protocol` + `zmserve.codec`.
"""

__version__ = "0.1.0"
