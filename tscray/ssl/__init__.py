"""Self-supervised learning: encoders' downstream evaluation and the SSL backdoor attacks.

- :mod:`tscray.ssl.probe`: linear probe + kNN monitor, :class:`ProbeEvaluator` (an ``Evaluate`` for defenses).
- :mod:`tscray.ssl.badencoder`: BadEncoder (Jia et al., 2022), fine-tunes a clean encoder into a backdoored one.
- :mod:`tscray.ssl.ctrl`: CTRL (Li et al., 2023), a frequency-domain trigger poisoning SimCLR pre-training.

These attacks produce encoders, not classifiers, so they live here rather than in ``tscray.attacks``.
SimCLR itself is the training method ``methods.build("simclr")``; the encoder models are registered as
``simclr-<backbone>`` by :mod:`tscray.models.encoder` (imported here so the names exist).
"""

from tscray.models import encoder as _encoder  # noqa: F401  (registers simclr-* architectures)
from tscray.ssl import ctrl
from tscray.ssl.badencoder import BadEncoderConfig, PatchTrigger, badencoder, reference_images
from tscray.ssl.ctrl import CTRLTrigger
from tscray.ssl.probe import ProbeEvaluator, add_target_class, extract, knn_predict, train_linear

__all__ = ["BadEncoderConfig", "CTRLTrigger", "PatchTrigger", "ProbeEvaluator", "add_target_class", "badencoder",
           "ctrl", "extract", "knn_predict", "reference_images", "train_linear"]
