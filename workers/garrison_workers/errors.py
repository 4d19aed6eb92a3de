"""Errors a user can cause in the data plane.

Each class is one kind of mistake with a message that says what to do. The control plane maps
each class to exactly one gRPC status (see DESIGN.md, "How the code should read" rule 8); the CLI
prints the message and exits non-zero instead of showing a traceback.
"""

from __future__ import annotations


class GarrisonError(Exception):
    """Base class for errors caused by input or environment, never by a bug in Garrison."""


class InvalidRequestError(GarrisonError):
    """The request itself is malformed: empty prompt, token outside the vocabulary, bad sampling value."""


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested tokens do not fit the model's context."""


class ModelLoadError(GarrisonError):
    """A model directory or file is missing, corrupt or of an unsupported architecture."""


class CapacityError(GarrisonError):
    """The engine cannot hold the request even when it runs alone (KV cache too small)."""


class LayoutError(GarrisonError):
    """A tensor/expert-parallel layout does not fit the model (e.g. tp does not divide the heads)."""


class UnavailableError(GarrisonError):
    """The server cannot serve this request now (a lost rank, a failed handoff, no capacity); a retry may succeed."""


class QueueFullError(GarrisonError):
    """A tenant already has as many requests waiting for a replica as it may (max_queued_per_tenant): retry once
    some have started. RESOURCE_EXHAUSTED, with `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple:  # crosses process boundaries (an engine core answers a gateway through Ray)
        return type(self), (str(self), self.retry_after_s)


class UnplaceableError(UnavailableError):
    """A worker group cannot be placed now: the cluster's slots (CPU slots or GPUs) are taken. It is placed once they
    free up; a layout the cluster could never hold is a LayoutError instead."""


class WorkerLostError(UnavailableError):
    """A rank of a worker group died; its in-flight requests failed and the group must be restarted."""


class SequenceError(GarrisonError):
    """One sequence failed inside the engine (its logits held NaN, its text could not be decoded): that request
    ends, the others in its batch go on. Not the client's doing: a fault of the model or of Garrison."""


class WeightStoreError(ModelLoadError):
    """Garrison's encrypted weight store refused a model. Messages name the model, file or tensor,
    never key bytes."""


class StoreIntegrityError(WeightStoreError):
    """A stored model failed authentication: a tensor record's tag, the manifest's signature, or a
    file's size does not match (changed, swapped, truncated or edited after import)."""


class KeyUnavailableError(WeightStoreError):
    """No key-encryption key could be had: no key provider is configured, or its file, variable or
    secret is missing or malformed."""


class WrongKeyError(WeightStoreError):
    """The key-encryption key does not unwrap the model's data key (another KEK, or a rotated one)."""
