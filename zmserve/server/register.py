"""`register_method` and `add_stage`, as in `mindspore_serving.server.register`."""

from zmserve.servable import add_stage, register_method

__all__ = ["add_stage", "register_method"]
