"""Train a small Mixture-of-Experts transformer language model on real text that needs no
download — the Python standard library's own source files — with optax, and compare tokens/s
and loss for three feed-forward blocks of equal active parameters:

  pit    pit_jax.nn.MoE (top-k, dropless, SwiGLU)
  ragged the same MoE written directly on jax.lax.ragged_dot
  dense  a dense SwiGLU FFN of the active width (k experts' worth)

    pip install ".[nn]" && python examples/moe_language_model.py [--steps 200] [--small]
        [--dtype bfloat16]

Parameters stay float32; --dtype sets the feed-forward blocks' compute dtype (bfloat16 runs
pit_jax's tensor-core kernels on a GPU; float32 its CUDA-core kernels). On a CPU, pit_jax's
MoE computes through lax.ragged_dot references, so `pit` then tracks `ragged`.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import pit_jax.nn


def load_text(max_bytes):
    """Bytes of the standard library's .py files (byte-level vocabulary of 256)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    data = bytearray()
    for path in files:
        with open(path, "rb") as fh:
            data += fh.read()
        if len(data) >= max_bytes:
            break
    return np.frombuffer(bytes(data[:max_bytes]), np.uint8).astype(np.int32)


class RaggedMoE(nnx.Module):
    """The same routed SwiGLU FFN, written the usual way on lax.ragged_dot."""

    def __init__(self, e, k, d, f, *, dtype, rngs):
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        self.k, self.dtype = k, dtype
        self.router = nnx.Linear(d, e, use_bias=False, rngs=rngs)
        self.w_in = nnx.Param(init(rngs.params(), (e, d, f)))
        self.w_gate = nnx.Param(init(rngs.params(), (e, d, f)))
        self.w_out = nnx.Param(init(rngs.params(), (e, f, d)))

    def __call__(self, x):
        tok = x.reshape(-1, x.shape[-1])
        p, ids = jax.lax.top_k(jax.nn.softmax(self.router(tok), -1), self.k)
        p = p / p.sum(-1, keepdims=True)
        order = jnp.argsort(ids.reshape(-1), stable=True)
        sizes = jnp.bincount(ids.reshape(-1), length=self.w_in.shape[0]).astype(jnp.int32)
        rows = tok[order // self.k].astype(self.dtype)
        w_in, w_gate, w_out = (w[...].astype(self.dtype) for w in (self.w_in, self.w_gate, self.w_out))
        h = jax.nn.silu(jax.lax.ragged_dot(rows, w_gate, sizes)) * jax.lax.ragged_dot(rows, w_in, sizes)
        out = jax.lax.ragged_dot(h, w_out, sizes).astype(x.dtype)
        out = jnp.zeros_like(out).at[order].set(out).reshape(tok.shape[0], self.k, -1)
        return jnp.einsum("tkd,tk->td", out, p).reshape(x.shape)


class DenseFFN(nnx.Module):
    def __init__(self, d, f, *, dtype, rngs):
        self.w_in = nnx.Linear(d, f, use_bias=False, dtype=dtype, rngs=rngs)
        self.w_gate = nnx.Linear(d, f, use_bias=False, dtype=dtype, rngs=rngs)
        self.w_out = nnx.Linear(f, d, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.w_out(jax.nn.silu(self.w_gate(x)) * self.w_in(x)).astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, d, heads, ffn, *, rngs):
        self.norm1, self.norm2 = nnx.RMSNorm(d, rngs=rngs), nnx.RMSNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.ffn = ffn

    def __call__(self, x, mask):
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.ffn(self.norm2(x))


class LM(nnx.Module):
    def __init__(self, kind, *, d, layers, heads, e, k, f, dtype, rngs):
        self.embed = nnx.Embed(256, d, rngs=rngs)
        make = {"pit": lambda: pit_jax.nn.MoE(e, k, d, f, dtype=dtype, rngs=rngs),
                "ragged": lambda: RaggedMoE(e, k, d, f, dtype=dtype, rngs=rngs),
                "dense": lambda: DenseFFN(d, k * f, dtype=dtype, rngs=rngs)}[kind]
        self.blocks = nnx.List([Block(d, heads, make(), rngs=rngs) for _ in range(layers)])
        self.norm = nnx.RMSNorm(d, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        mask = nnx.make_causal_mask(tokens)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.embed.attend(self.norm(x))


def run(kind, data, args):
    cfg = dict(d=args.d, layers=args.layers, heads=4, e=args.experts, k=args.top_k, f=args.d_ff,
               dtype=jnp.dtype(args.dtype))
    model = LM(kind, rngs=nnx.Rngs(0), **cfg)
    opt = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, batch):
        def loss_fn(model):
            # MoE load-balancing losses (pit only): nnx.capture on flax >= 0.12.8, which deprecates
            # sowing outside it; nnx.pop after the call before that
            if hasattr(nnx, "capture"):
                logits, aux = nnx.capture(model, nnx.Intermediate)(batch[:, :-1])
            else:
                logits = model(batch[:, :-1])
                aux = nnx.pop(model, nnx.Intermediate)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
            lb = sum(v[0] for key, v in aux.flat_state() if key[-1] == "load_balancing_loss") if aux else 0.0
            return loss + 0.01 * lb, loss
        (_, loss), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(0)
    n_tok, t_run, losses = 0, 0.0, []
    for i in range(args.steps):
        starts = rng.integers(0, len(data) - args.seq - 1, args.batch)
        batch = jnp.asarray(np.stack([data[s:s + args.seq + 1] for s in starts]))
        t0 = time.perf_counter()
        loss = float(step(model, opt, batch))
        if i >= 3:  # skip compilation
            t_run += time.perf_counter() - t0
            n_tok += args.batch * args.seq
        losses.append(loss)
        done = int(30 * (i + 1) / args.steps)
        sys.stdout.write(f"\r  {kind:<6} [{'#' * done}{'.' * (30 - done)}] {i + 1}/{args.steps} loss {loss:.3f}")
        sys.stdout.flush()  # a terminal shows the bar only at a newline otherwise
    sys.stdout.write("\n")
    return float(np.mean(losses[-10:])), (n_tok / t_run if n_tok else float("nan"))  # nan: no step after the first 3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 200; 30 with --small)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--d-ff", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="compute dtype of the feed-forward blocks (parameters stay float32)")
    ap.add_argument("--small", action="store_true",
                    help="a tiny configuration for a quick check (30 steps unless --steps is given)")
    args = ap.parse_args()
    if args.steps is None:
        args.steps = 30 if args.small else 200
    if args.small:
        args.batch, args.seq, args.d, args.d_ff, args.layers = 4, 32, 32, 32, 1
    data = load_text(2_000_000)
    print(f"text: {len(data)} bytes of stdlib source; device {jax.devices()[0].device_kind}; "
          f"FFN dtype {args.dtype}; {vars(args)}")
    results = {kind: run(kind, data, args) for kind in ("pit", "ragged", "dense")}
    print(f"\n{'FFN':<8}{'final loss':>12}{'tokens/s':>12}")
    for kind, (loss, tps) in results.items():
        print(f"{kind:<8}{loss:>12.3f}{tps:>12.0f}")


if __name__ == "__main__":
    main()
