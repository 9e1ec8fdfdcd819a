"""The broad lab family: a small CLIP pretrained on captioned scenes of many concepts.

The first lab family's text tower knows only the ten captions it is scored on, so zero-shot is
already its accuracy optimum and few-shot prompt tuning can only lose. The CLIPs users bring are
pretrained on broad captions and used downstream on tasks whose class names they know only from
pretraining. This family is built the same way, offline: a generated corpus of captioned scenes
(``corpus``), a base CLIP pretrained on it, and downstream tasks drawn from a shifted
distribution (``tasks``).
"""
