"""Qwen2 (and 2.5): Llama's layout with biases on q, k and v."""

import functools

from server.engine.native.config import NativeConfig
from server.engine.native.families import ModelFamily, register

register(ModelFamily("qwen2", functools.partial(NativeConfig.from_dict, qkv_bias=True)))
