"""The runners: one way to run every implementation on a problem, for its check and its timed
calls. nbflash's impls (every registered one, nbflash.impls) run through the public API; torch's
scaled_dot_product_attention runs beside them when torch is importable on the GPU ("torch":
default backend choice, TF32 off so float32 is exact float32; "torch-flash": forced onto its
FlashAttention-2 backend, float16 only).

A runner runs one impl on one Group's copies (nbflash.bench.reference.Group).
check_forward(copies) -> o and check_backward(copies) -> (dq, dk, dv) run once on copy 0 for the
correctness check (device arrays); timed(pass_, copies, i) does the untimed preparation for a
call on copy i and returns the call to time (for bwd the forward that produces o and lse, for
torch the autograd graph on fresh leaf tensors, runs outside the timed region; fwdbwd times
both). unchecked: None, or why the reference does not describe its outputs (torch draws its own
dropout mask). Options go to nbflash impls through the API, forward and backward alike; torch
gets the equivalent boolean attn_mask (the causal mask folded in) for padding and block-sparse
points, which torch-flash cannot take ("unsupported").
"""

import contextlib

import numpy as np

import nbflash
from .. import impls as registry
from .._cuda import MODE
from .device import Unsupported

TORCH_IMPLS = ("torch", "torch-flash")


def nbflash_impls():
    """Every registered nbflash impl (nbflash.impls): naive, fa1, fa2, tc, ..."""
    return registry.names()


def known_impls():
    """Every impl name the harness knows, whether or not it can run here."""
    return nbflash_impls() + TORCH_IMPLS


def torch_module():
    """The torch module when it is importable and nbflash runs on the GPU, else None."""
    if MODE != "gpu":
        return None
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def default_impls():
    """torch's two series when torch can run here, then every nbflash impl."""
    return (TORCH_IMPLS if torch_module() is not None else ()) + nbflash_impls()


class NbflashRunner:
    """An nbflash impl through the public API; options: the Group's API options, given to the
    forward and the backward alike."""

    unchecked = None

    def __init__(self, impl, causal, options=None):
        self.impl, self.causal, self.options = impl, causal, options or {}
        self._saved = {}   # copy index -> this impl's (o, lse), the backward's inputs

    def context(self):
        return contextlib.nullcontext()

    def forward(self, q, k, v):
        return nbflash.attention_forward(q, k, v, causal=self.causal, impl=self.impl,
                                         **self.options)

    def backward(self, do, q, k, v, o, lse):
        return nbflash.attention_backward(do, q, k, v, o, lse, causal=self.causal,
                                          impl=self.impl, **self.options)

    def _fwd_outputs(self, copies, i):
        if i not in self._saved:
            self._saved[i] = self.forward(*copies[i][:3])
        return self._saved[i]

    def check_forward(self, copies):
        return self._fwd_outputs(copies, 0)[0]

    def check_backward(self, copies):
        q, k, v, do = copies[0]
        return self.backward(do, q, k, v, *self._fwd_outputs(copies, 0))

    def timed(self, pass_, copies, i):
        q, k, v, do = copies[i]
        if pass_ == "fwd":
            return lambda: self.forward(q, k, v)
        if pass_ == "bwd":
            o, lse = self._fwd_outputs(copies, i)
            return lambda: self.backward(do, q, k, v, o, lse)

        def fwdbwd():
            o, lse = self.forward(q, k, v)
            self.backward(do, q, k, v, o, lse)
        return fwdbwd


class TorchRunner:
    """torch.nn.functional.scaled_dot_product_attention on the CuPy arrays (shared through
    DLPack), backward through autograd on fresh leaf tensors. flash=True forces the
    FlashAttention backend (float16 only, no attn_mask). With a group: its dropout_p (torch's
    own generator: the outputs go unchecked) and, for key lengths and block masks, the
    equivalent attn_mask."""

    def __init__(self, causal, dtype, flash=False, group=None):
        torch = torch_module()
        if torch is None:
            raise Unsupported("torch runs only when it is importable and nbflash is on the GPU "
                              f"(mode here: {MODE})")
        if flash and np.dtype(dtype) != np.float16:
            raise Unsupported(f"torch's FlashAttention backend takes float16, not {dtype}")
        masked = group is not None and group.masked()
        if flash and masked:
            raise Unsupported("torch's FlashAttention backend takes no attn_mask (key padding, "
                              "block-sparse)")
        self.torch, self.causal, self.flash = torch, causal, flash
        self.attn_mask = torch.from_dlpack(group.attn_mask()).to(torch.bool) if masked else None
        self.dropout_p = group.dropout_p if group is not None else 0.0
        self.unchecked = ("torch draws its own dropout mask, which nbflash's reference does not "
                          "know") if self.dropout_p else None
        self._pending = None   # (q, k, v, do, o) of the check forward, for the check backward

    def context(self):
        """torch on CuPy's current stream (where the events are recorded; both are the default
        stream unless someone changed one), and the FlashAttention backend for torch-flash."""
        import cupy  # noqa: PLC0415
        stack = contextlib.ExitStack()
        ptr = cupy.cuda.get_current_stream().ptr
        if self.torch.cuda.current_stream().cuda_stream != ptr:
            stack.enter_context(self.torch.cuda.stream(self.torch.cuda.ExternalStream(ptr)))
        if self.flash:
            from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415
            stack.enter_context(sdpa_kernel(SDPBackend.FLASH_ATTENTION))
        return stack

    def forward(self, q, k, v):
        # default scale 1/sqrt(d) as nbflash's; is_causal is top-left aligned, the same as
        # nbflash's bottom-right alignment when Nq == Nk, as everywhere in the grid; torch takes
        # is_causal or attn_mask, so with a mask the causal one is folded into it
        sdpa = self.torch.nn.functional.scaled_dot_product_attention
        if self.attn_mask is not None:
            return sdpa(q, k, v, attn_mask=self.attn_mask, dropout_p=self.dropout_p)
        return sdpa(q, k, v, is_causal=self.causal, dropout_p=self.dropout_p)

    def _tensors(self, copy, grad):
        q, k, v, do = (self.torch.from_dlpack(x) for x in copy)
        if grad:   # fresh leaves sharing the arrays' memory: each backward gets its own graph
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        return q, k, v, do

    @staticmethod
    def _cupy(t):
        import cupy  # noqa: PLC0415
        return cupy.from_dlpack(t.detach())

    def check_forward(self, copies):
        q, k, v, do = self._tensors(copies[0], grad=True)
        o = self.forward(q, k, v)
        self._pending = (q, k, v, do, o)
        return self._cupy(o)

    def check_backward(self, copies):
        q, k, v, do, o = self._pending
        self._pending = None
        o.backward(do)
        return tuple(self._cupy(t.grad) for t in (q, k, v))

    def timed(self, pass_, copies, i):
        if pass_ == "fwd":
            q, k, v, _ = self._tensors(copies[i], grad=False)
            return lambda: self.forward(q, k, v)
        q, k, v, do = self._tensors(copies[i], grad=True)
        if pass_ == "bwd":
            o = self.forward(q, k, v)
            return lambda: o.backward(do)
        return lambda: self.forward(q, k, v).backward(do)


def make_runner(impl, causal, dtype, group=None):
    """The runner for `impl`, with the options of `group` (None: none); raises Unsupported for
    an impl that cannot run here."""
    if impl in TORCH_IMPLS:
        return TorchRunner(causal, dtype, flash=impl == "torch-flash", group=group)
    if impl not in nbflash_impls():
        raise Unsupported(f"impl {impl!r} is not available (nbflash has {nbflash_impls()})")
    return NbflashRunner(impl, causal, group.options if group is not None else None)


@contextlib.contextmanager
def exact_float32():
    """No TF32 in torch's float32 matrix products (restored on exit)."""
    torch = torch_module()
    if torch is None:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
