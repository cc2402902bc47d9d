"""Imports every family module so its adapter registers itself."""

from pipeline.models import (  # noqa: F401
    deepseek_v2,
    deepseek_v3,
    dots1,
    ernie4_5_moe,
    flex_olmo,
    glm4_moe,
    gpt_oss,
    granitemoe,
    hunyuan_v1_moe,
    llama4,
    minimax,
    mixtral,
    olmoe,
    phimoe,
    qwen2_moe,
    qwen3_moe,
)
