"""The frozen backbone: loading (short name, Hugging Face directory or GGUF) and one
family-agnostic interface (`Backbone`) that the rest of longside talks to."""

from longside.backbone.core import (Backbone, BackboneOutput, BackboneSpec, apply_rotary, check_token_ids,
                                    encode_memory, feature_quantization, plain_text, quiet_loading, tokenize)
from longside.backbone.loading import backbone_source, load_backbone, load_tokenizer, quantize_backbone

__all__ = ["Backbone", "BackboneOutput", "BackboneSpec", "apply_rotary", "backbone_source", "check_token_ids",
           "encode_memory", "feature_quantization", "load_backbone", "load_tokenizer", "plain_text", "quantize_backbone", "quiet_loading",
           "tokenize"]
