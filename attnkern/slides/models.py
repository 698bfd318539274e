"""The models ``attnkern profile`` builds (timm architectures; random weights unless a
checkpoint is given). Plain data, so the command line can list them without importing torch."""

# ResNets are built without timm's zero initialisation of each block's last BatchNorm: with it,
# every attention block of a randomly initialised model sees only zeros (so its gates are a
# constant 0.5 and the heatmap is flat) and the fused and naive blocks are compared on zeros.
MODELS = {
    "cbam_resnet50": ("resnet50", dict(block_args=dict(attn_layer="cbam"), zero_init_last=False)),
    "cbam_resnet18": ("resnet18", dict(block_args=dict(attn_layer="cbam"), zero_init_last=False)),
    "seresnet50": ("seresnet50", dict(zero_init_last=False)),
    "resnet50": ("resnet50", dict(zero_init_last=False)),
    # ViTs take any tile size (position embeddings interpolated); the heatmap is the CLS token's
    # attention over the patches in the last block, from attnkern.explain.attention_rows.
    "vit_small": ("vit_small_patch16_224", dict(dynamic_img_size=True)),
    "vit_tiny": ("vit_tiny_patch16_224", dict(dynamic_img_size=True)),
}

DESCRIPTIONS = {
    "cbam_resnet50": "ResNet-50 with a CBAM block in every bottleneck",
    "cbam_resnet18": "ResNet-18 with a CBAM block in every basic block",
    "seresnet50": "SE-ResNet-50 (squeeze-and-excitation)",
    "resnet50": "plain ResNet-50 (no attention block)",
    "vit_small": "ViT-S/16 (self-attention; any tile size)",
    "vit_tiny": "ViT-Ti/16 (self-attention; any tile size)",
}

VARIANTS = ("naive", "compile", "fused", "fused-compile")
EXPLAIN = ("attention", "gradcam", "cam", "guided-gradcam")
