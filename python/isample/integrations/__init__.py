"""Adapters that plug isample's samplers into training frameworks.

Every adapter speaks one backend protocol (``isample.integrations.protocol``, documented in
``docs/backend_protocol.md``): take the batch's dataset indices, compute per-example losses
(``reduction="none"``), weight them with ``sampler.weights(indices)``, and hand them back
with ``sampler.update(indices, losses)``.

- ``isample.integrations.protocol``: ``weighted_loss``, ``split_batch`` (torch only).
- ``isample.integrations.lightning``: ``ImportanceSamplingCallback`` and ``weighted_loss``
  for ``lightning.Trainer`` (``pip install "isample[lightning]"``).
- ``isample.integrations.huggingface``: ``ImportanceTrainer``, a ``transformers.Trainer``
  (``pip install "isample[hf]"``).
- ``isample.integrations.replay``: ``PrioritizedReplayBuffer``, prioritized experience
  replay with cpprb's API, a drop-in for cpprb's buffer (torch only; ``docs/adapters.md``).

This package imports none of the frameworks: each adapter module imports its library when
it is imported itself, and names the extra to install when that library is missing.
"""
