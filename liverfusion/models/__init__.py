"""Plain nn.Module building blocks: encoders, SimSiam heads and loss, collapse metric, fusion blocks, classifier.

Nothing here trains; the LightningModules in ``liverfusion.modules`` compose these. Parameter and FLOP
counts live in ``liverfusion.models.complexity`` (also a command: ``python -m liverfusion.models.complexity``).
"""

from liverfusion.models.classifier_net import (
    ClassifierOutput,
    EncodedModalities,
    FusionClassifierNet,
    build_fusion_classifier,
    fusion_class,
)
from liverfusion.models.collapse import L2NormalizedStd, collapse_level, std_of_l2_normalized
from liverfusion.models.encoder_base import Encoder, EncoderOutput, load_local_weights
from liverfusion.models.encoder_factory import ENCODERS, build_encoder, encoder_config_diff
from liverfusion.models.fusion import (
    FUSIONS,
    CGCBlock,
    CGCFusion,
    EarlyFusion,
    Fusion,
    FusionOutput,
    LateConcatFusion,
    LateMeanFusion,
    SingleModalityFusion,
    build_fusion,
)
from liverfusion.models.heads import ClassifierHead, PredictionHead, ProjectionHead
from liverfusion.models.losses import NegativeCosineSimilarity, SimSiamLoss, negative_cosine_similarity
from liverfusion.models.resnet3d import ResNetEncoder
from liverfusion.models.slab2d import Slab2dEncoder

__all__ = [
    "ENCODERS",
    "FUSIONS",
    "CGCBlock",
    "CGCFusion",
    "ClassifierHead",
    "ClassifierOutput",
    "EarlyFusion",
    "EncodedModalities",
    "Encoder",
    "EncoderOutput",
    "Fusion",
    "FusionClassifierNet",
    "FusionOutput",
    "L2NormalizedStd",
    "LateConcatFusion",
    "LateMeanFusion",
    "NegativeCosineSimilarity",
    "PredictionHead",
    "ProjectionHead",
    "ResNetEncoder",
    "SimSiamLoss",
    "SingleModalityFusion",
    "Slab2dEncoder",
    "build_encoder",
    "build_fusion",
    "build_fusion_classifier",
    "collapse_level",
    "encoder_config_diff",
    "fusion_class",
    "load_local_weights",
    "negative_cosine_similarity",
    "std_of_l2_normalized",
]
