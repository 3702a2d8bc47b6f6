"""The shipped tiny tool-calling model (assets/tiny-kimi): corpus, value catalogue, the
prepare/train/score/export steps, and the dialogue evaluation.

`train` needs only torch, transformers, numpy and safetensors (it runs on a bare GPU host
from a checkout); everything else runs on the CPU with kimi_trt installed.
"""
