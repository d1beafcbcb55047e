"""Feedback on generated samples: the store every sample is recorded in, and (with the
serving and fine-tuning tasks) the loop that turns ratings into a better model."""

from genframe.feedback.store import (
    FEEDBACK_ENV,
    FeedbackStore,
    SampleRecord,
    UnknownSample,
    default_path,
    new_id,
    sample_records,
)

__all__ = ["FEEDBACK_ENV", "FeedbackStore", "SampleRecord", "UnknownSample", "default_path", "new_id", "sample_records"]
