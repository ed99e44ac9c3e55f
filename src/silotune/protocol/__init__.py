"""The client-server protocol: typed messages and their byte encoding."""

from .codec import decode, encode, wire_dtype
from .messages import Aggregation, Control, ForwardActivations, Gradients, Message, ReturnedActivations

__all__ = ["Message", "ForwardActivations", "ReturnedActivations", "Gradients", "Aggregation",
           "Control", "encode", "decode", "wire_dtype"]
