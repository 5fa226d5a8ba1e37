"""Llama (1, 2, 3.x): the native runner's reference family."""

from server.engine.native.config import NativeConfig
from server.engine.native.families import ModelFamily, register

register(ModelFamily("llama", NativeConfig.from_dict))
