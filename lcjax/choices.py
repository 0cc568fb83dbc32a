"""The names a config may choose, defined once: config validation reads them, and the layers that
implement them are checked against them (tests/core/test_choices.py). Plain tuples; this module imports
nothing, so every layer may use it (docs/design.md, "Choice lists once").

To add a choice (an attention impl, a layout, a kernel, a remat policy, a RoPE type), add its name here
and its entry to the implementing table named beside the list; the test fails until both agree.
"""

AXES = ("data", "sequence", "model")  # mesh axis names, always in this order (lcjax.sharding.mesh.AXES)
ATTENTION_IMPLS = ("local", "ring", "ulysses", "hybrid", "allgather")  # lcjax.parallel.sequence.IMPLEMENTATIONS
LAYOUTS = ("contiguous", "zigzag", "striped", "balanced")  # lcjax.ops.layout (balanced: lcjax.data.balance)
KERNELS = ("xla", "pallas", "pallas_triton", "pallas_mosaic", "cudnn")  # lcjax.kernels.flash_attention.api.KERNELS
DKV_DTYPES = ("float32", "bfloat16")  # the backward ring's dK/dV wire dtype (lcjax.parallel.ring)
DTYPES = ("float32", "bfloat16")  # train.dtype, train.param_dtype
REMAT_POLICIES = ("none", "layer", "full", "attention", "dots")  # lcjax.model.llama.REMAT_POLICIES + none
OFFLOAD_MODES = ("none", "layer", "saved")  # train.offload: lcjax.model.offload.OFFLOAD_MODES
ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn", "llama3")  # lcjax.ops.rope (scalings)
