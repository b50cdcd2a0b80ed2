"""The states of a stored message and of a callback, one closed set each (PROTOCOL.md).

``StrEnum`` members equal their strings, so the store, the wire and the admin API keep
the same values.
"""

from __future__ import annotations

import enum

__all__ = [
    "ANSWERED_STATES",
    "AWAITING_CALLBACK",
    "IN_DELIVERY",
    "CallbackState",
    "MessageState",
]


class MessageState(enum.StrEnum):
    """accepted → delivering → delivered → answered → callback_delivered, or failed / dead."""

    ACCEPTED = "accepted"  # durably recorded for the outbox (async), not yet sent
    DELIVERING = "delivering"  # a synchronous exchange is with its adapter now
    DELIVERED = "delivered"  # the upstream acknowledged (202); its answer comes by callback
    ANSWERED = "answered"  # the final answer is stored
    CALLBACK_DELIVERED = "callback_delivered"  # ... and handed to the member's callback URL
    FAILED = "failed"  # a synchronous exchange ended in an error (its problem is stored)
    DEAD = "dead"  # the outbox gave up (attempt or age limit): a dead letter


class CallbackState(enum.StrEnum):
    """A callback on its way to the member: pending → delivered, or dead."""

    PENDING = "pending"  # recorded, waiting for (another) attempt
    DELIVERED = "delivered"  # the member's callback URL answered 2xx
    DEAD = "dead"  # past the attempt or age limit: a dead letter


# The closed sets the store's guards name (gateway/store): which states a transition may
# leave, and so which a callback finds its message in.
IN_DELIVERY = (MessageState.ACCEPTED, MessageState.DELIVERING)  # in the outbox, on its way
AWAITING_CALLBACK = (MessageState.DELIVERED,)  # acknowledged; the decision is awaited
ANSWERED_STATES = (MessageState.ANSWERED, MessageState.CALLBACK_DELIVERED)  # a final result
