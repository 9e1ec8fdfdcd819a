"""Up-front checks on uploaded checkpoints and datasets, so that bad input gets a 4xx, not a job.

The API runs these before it queues anything: a job that can only fail should fail while the
client is still waiting for the answer, with a stable code it can act on. Everything here reads
headers and archive directories only (no unpickling, no tensor loading, no image decoding), so it
is cheap, cannot execute anything an upload holds, and keeps torch out of the API process.

The rules follow what the worker will accept later (``worker.cbpt.checkpoint`` and
``worker.cbpt.imagesets``), sometimes more strictly, never more loosely: passing here does not
promise the job succeeds, but failing here means it could not have.
"""

from service.validation.checkpoints import CheckpointInfo, check_checkpoint
from service.validation.common import InputError
from service.validation.datasets import DatasetInfo, check_dataset

__all__ = ["CheckpointInfo", "DatasetInfo", "InputError", "check_checkpoint", "check_dataset"]
