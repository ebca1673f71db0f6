"""Math for the numba CPU kernels (:mod:`salmm.model.scan_cpu`, :mod:`salmm.model.layer_cpu`,
:mod:`salmm.model.mamba_cpu`): a vectorisable exp within 2 ulp, sigmoid and softplus as torch
computes them, GELU, 2**k from bits, a fused multiply-add, an atomic job counter, a prefetch hint,
and the scans' per-channel steps over the states as explicit LLVM vector code
(:func:`state_vectors`). Usable inside ``numba.njit`` code only; float32 and float64.

Fused multiply-adds are only ever asked for by name (:func:`fma`), never left to the compiler
(fastmath ``"contract"``): numba's in-process compile and its cached machine code fuse
differently, so results would depend on whether a process compiled the kernels; an explicit
``llvm.fma`` is one rounding wherever and however it is compiled."""

from __future__ import annotations

import math
import warnings

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from salmm.model import numba_cache  # noqa: F401 (before any kernel: caches keyed on all sources)

__all__ = ["DECAY_FLOOR", "ERF_TAIL", "EXP_REDUCTION", "LANES", "SOFTPLUS_THRESHOLD", "StateOps",
           "claim", "exp", "fma", "gelu", "pow2", "prefetch", "sigmoid", "softplus",
           "state_vectors"]

# numba's pedantic IR check trips over the inlined overloads below when it compiles the kernels
# that use them (a harmless "variable ... is not in scope", raised from numba's own modules and
# several lines each, on a user's first run): that category is not shown
warnings.filterwarnings("ignore", category=numba.core.errors.NumbaIRAssumptionWarning)

LOG2_E = 1.4426950408889634
SOFTPLUS_THRESHOLD = 20.0  # as torch.nn.functional.softplus: above it, x passes through


@intrinsic
def pow2(typingctx, k):
    """2 ** k for an integral float32 / float64 k in the normal exponent range, from bits."""
    if k == types.float32:
        int_type, float_type, bias, shift = ir.IntType(32), ir.FloatType(), 127, 23
    elif k == types.float64:
        int_type, float_type, bias, shift = ir.IntType(64), ir.DoubleType(), 1023, 52
    else:
        return None

    def codegen(context, builder, signature, args):
        exponent = builder.add(builder.fptosi(args[0], int_type), int_type(bias))
        return builder.bitcast(builder.shl(exponent, int_type(shift)), float_type)

    return k(k), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c rounded once (``llvm.fma``: one instruction on AVX2 / AVX-512 machines, and it
    vectorises); a, b, c all float32 or all float64."""
    if not (a == b == c and a in (types.float32, types.float64)):
        return None

    def codegen(context, builder, signature, args):
        kind = args[0].type
        function = builder.module.declare_intrinsic("llvm.fma", [kind],
                                                    ir.FunctionType(kind, [kind, kind, kind]))
        return builder.call(function, args)

    return a(a, b, c), codegen


@intrinsic
def claim(typingctx, counter):
    """Atomically ``counter[0] += 1`` (int64 array); returns the value before."""
    if not isinstance(counter, types.Array) or counter.dtype != types.int64:
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", data, ir.IntType(64)(1), "monotonic")

    return types.int64(counter), codegen


@intrinsic
def prefetch(typingctx, array, index):
    """A hint to bring the cache line of ``array.flat[index]`` (a C-contiguous array) in for
    reading, soon; no effect on results, nothing read or checked (an index past the end is
    harmless: a prefetch never faults)."""
    if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        address = builder.bitcast(builder.gep(data, [offset]), ir.IntType(8).as_pointer())
        hint = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), ir.IntType(32),
                                               ir.IntType(32), ir.IntType(32)])
        function = builder.module.declare_intrinsic("llvm.prefetch", [address.type], hint)
        builder.call(function, [address, ir.IntType(32)(0), ir.IntType(32)(3), ir.IntType(32)(1)])
        return context.get_dummy_value()

    return types.none(array, index), codegen


def _reduced(x):
    """(exp(r), k) with x = k ln2 + r; implemented for numba only (see the overload below)."""
    raise NotImplementedError


EXP_REDUCTION = {
    types.float32: (0.693359375, -2.12194440e-4,
                    (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                     1.6666665459e-1, 5.0000001201e-1)),
    types.float64: (6.93145751953125e-1, 1.42860682030941723212e-6,
                    tuple(1.0 / math.factorial(j) for j in range(13, 1, -1))),
}
"""Per float type, exp's (ln2 = hi + lo split, polynomial for exp(r) highest power first):
float32 Cephes' expf, float64 Taylor to r**13."""
DECAY_FLOOR = {types.float32: -87.33654, types.float64: -708.3964185322641}
"""Per float type, the log of the least normal number: below it :meth:`StateOps.decay` gives 0."""


@overload(_reduced, inline="always")
def _reduced_overload(x):
    """Cody-Waite reduction x = k ln2 + r, |r| <= ln2 / 2, and a polynomial for exp(r)
    (:data:`EXP_REDUCTION`), for x inside exp's range; the reduction and Horner's steps are
    fused multiply-adds."""
    if x not in EXP_REDUCTION:
        return None
    f = np.float32 if x == types.float32 else np.float64
    ln2_hi, ln2_lo, coefficients = EXP_REDUCTION[x]
    minus_ln2_hi, minus_ln2_lo, log2_e = f(-ln2_hi), f(-ln2_lo), f(LOG2_E)
    coefficients = tuple(f(c) for c in coefficients)
    one, half = f(1.0), f(0.5)

    def impl(x):
        k = np.floor(x * log2_e + half)
        r = fma(k, minus_ln2_lo, fma(k, minus_ln2_hi, x))
        p = coefficients[0]
        for c in coefficients[1:]:
            p = fma(p, r, c)
        return fma(p * r, r, r) + one, k

    return impl


def exp(x):
    """exp(x), vectorisable; implemented for numba only (see the overload below)."""
    raise NotImplementedError


@overload(exp, inline="always")
def _exp_overload(x):
    """:func:`_reduced`, then 2**k from bits in two halves so that subnormal results come out
    right. Within 2 ulp of exp(x); below the subnormal range 0, above the overflow threshold
    inf, NaN stays NaN."""
    if x not in (types.float32, types.float64):
        return None
    f = np.float32 if x == types.float32 else np.float64
    lo, hi = (f(-104.0), f(89.0)) if x == types.float32 else (f(-746.0), f(710.0))
    half = f(0.5)

    def impl(x):
        p, k = _reduced(min(max(x, lo), hi))  # numba's max / min return a NaN first argument
        k_half = np.floor(k * half)
        e = p * pow2(k_half) * pow2(k - k_half)
        return e - e if x < lo else e  # 0 below the range

    return impl


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def sigmoid(x, f):
    """sigmoid(x) for a float32 / float64 x of type f, and exp(-|x|)."""
    e = exp(-abs(x))
    return (f(1.0) if x >= f(0.0) else e) / (f(1.0) + e), e


ERF_TAIL = (0.3275911, (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592))
"""Abramowitz and Stegun's 7.1.26 (the handbook's formula, whose form torch's float32 vector
GELU uses): erfc(z) ~= t (a1 + t (a2 + ... + t a5)) exp(-z**2) with t = 1 / (1 + p z), z >= 0,
within 1.5e-7 of the exact value: (p, (a5 .. a1))."""


def gelu(x):
    """GELU(x) = x (1 + erf(x / sqrt 2)) / 2, the exact form (not the tanh approximation), for
    a float32 / float64 x; implemented for numba only (see the overload below)."""
    raise NotImplementedError


@overload(gelu, inline="always")
def _gelu_overload(x):
    """float32: with c = erfc(|x| / sqrt 2) from :data:`ERF_TAIL` (vectorisable: one division,
    :func:`exp`), 1 + erf(x / sqrt 2) is 2 - c for x >= 0 and c itself below, which keeps the
    negative side's small values relative (torch's 1 + (c - 1) cancels there); within 1e-7 of
    the exact GELU plus a few ulp. float64: ``math.erf`` (scalar: float64 models are for
    checks)."""
    if x == types.float64:
        def exact(x):
            return 0.5 * x * (1.0 + math.erf(x * 0.7071067811865476))

        return exact
    if x != types.float32:
        return None
    f = np.float32
    p, coefficients = f(ERF_TAIL[0]), tuple(f(c) for c in ERF_TAIL[1])
    one, two, half, root_half = f(1.0), f(2.0), f(0.5), f(0.7071067811865476)

    def impl(x):
        z = abs(x) * root_half
        t = one / fma(p, z, one)
        poly = coefficients[0]
        for c in coefficients[1:]:
            poly = fma(poly, t, c)
        tail = poly * t * exp(-(z * z))
        return x * half * (two - tail if x >= f(0.0) else tail)

    return impl


def softplus(x):
    """(softplus(x) as torch computes it, its derivative sigmoid(x)) for a float32 / float64 x;
    implemented for numba only (see the overload below)."""
    raise NotImplementedError


@overload(softplus, inline="always")
def _softplus_overload(x):
    """softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|), log1p(e) = 2 atanh(s) =
    2 s sum_j s**2j / (2j + 1) with s = e / (2 + e) <= 1/3: the series cut where its next term
    is below the type's precision (float32: 8 terms, under 2e-9 relative; float64: 17); x
    above torch's threshold passes through."""
    if x not in (types.float32, types.float64):
        return None
    f = np.float32 if x == types.float32 else np.float64
    terms = 8 if x == types.float32 else 17
    coefficients = tuple(f(1.0 / (2 * j + 1)) for j in range(terms - 2, -1, -1))
    last, threshold = f(1.0 / (2 * terms - 1)), f(SOFTPLUS_THRESHOLD)

    def impl(x):
        sig, e = sigmoid(x, f)
        s = e / (f(2.0) + e)
        q = s * s
        series = last
        for coefficient in coefficients:
            series = series * q + coefficient
        if x > threshold:
            return x, f(1.0)
        return max(x, f(0.0)) + f(2.0) * s * series, sig

    return impl


LANES = 16
"""Lanes of the scans' explicit vector code: SalM²'s and Mamba's default d_state, so a channel's
states are one LLVM vector."""


def state_vectors(body, arrays: int, sums: int, straight: bool, args: tuple):
    """The typing and code of a numba intrinsic running ``body`` over one channel's n states as
    LLVM vector code, :data:`LANES` states a vector: ``straight``, n must be :data:`LANES` (one
    vector, no loop); else any n (vectors in a loop, the last one masked to n). Its arguments
    ``args``: ``arrays`` arrays [*, n], all C-contiguous and of one float type, then a tuple of
    ``arrays`` integers, the row each array is read and written at, then float scalars. (Rows by
    number, not row views: a view made in a loop costs two atomic reference-count updates.)
    ``body(ops, k, scalars)`` builds one vector's work with ``ops`` (:class:`StateOps`) and
    returns ``sums`` vectors, whose lanes the intrinsic adds up (reassociated) and returns.
    Written so because numba's loops over the states paid some 40 scalar instructions of
    address bookkeeping per channel (about 20 rows live at once, spilled to the stack)."""
    kind = args[0].dtype if isinstance(args[0], types.Array) else None
    if kind not in (types.float32, types.float64) or not all(
            isinstance(t, types.Array) and t.dtype == kind and t.layout == "C" and t.ndim == 2
            for t in args[:arrays]):
        return None
    where = args[arrays]
    if not (isinstance(where, types.BaseTuple) and len(where) == arrays
            and all(isinstance(t, types.Integer) for t in where)):
        return None
    lane = ir.FloatType() if kind == types.float32 else ir.DoubleType()
    element = 4 if kind == types.float32 else 8
    vector = ir.VectorType(lane, LANES)
    signature = (types.UniTuple(kind, sums) if sums else types.void)(*args)

    def codegen(context, builder, sig, values):
        indices = [context.cast(builder, v, t, types.intp) for v, t in
                   zip(cgutils.unpack_tuple(builder, values[arrays]), sig.args[arrays])]
        scalars = [context.cast(builder, v, t, kind)
                   for v, t in zip(values[arrays + 1:], sig.args[arrays + 1:])]
        views = [context.make_array(t)(context, builder, v)
                 for t, v in zip(sig.args[:arrays], values)]
        n = cgutils.unpack_tuple(builder, views[0].shape)[1]
        rows = [builder.gep(view.data, [builder.mul(index, n)])
                for view, index in zip(views, indices)]
        suffix = f"v{LANES}f{8 * element}"

        def declared(name, returned, operands):
            return cgutils.get_or_insert_function(builder.module,
                                                  ir.FunctionType(returned, operands), name)

        fused = declared(f"llvm.fma.{suffix}", vector, [vector] * 3)
        total = declared(f"llvm.vector.reduce.fadd.{suffix}", lane, [lane, vector])

        def at(i, k):  # element alignment only: a row need not start on a vector's
            return builder.bitcast(builder.gep(rows[i], [k]), vector.as_pointer())

        def splat(value):  # a scalar (a float, or an index) in every lane
            wide = ir.VectorType(value.type, LANES)
            one = builder.insert_element(ir.Constant(wide, ir.Undefined), value,
                                         ir.Constant(ir.IntType(32), 0))
            return builder.shuffle_vector(one, ir.Constant(wide, ir.Undefined),
                                          ir.Constant(ir.VectorType(ir.IntType(32), LANES),
                                                      [0] * LANES))

        def ops(load, store):
            return StateOps(load, store, lambda *v: builder.call(fused, v), splat,
                             lambda value: ir.Constant(vector, [value] * LANES), builder,
                             kind, declared, suffix)

        def reduce(terms):
            return builder.call(total, [ir.Constant(lane, 0.0), terms],
                                fastmath=("reassoc",))

        if straight:
            terms = body(ops(lambda i, k: builder.load(at(i, k), align=element),
                             lambda v, i, k: builder.store(v, at(i, k), align=element)),
                         ir.Constant(n.type, 0), scalars)
            results = [reduce(t) for t in terms]
        else:
            mask_type = ir.VectorType(ir.IntType(1), LANES)
            masked_load = declared(f"llvm.masked.load.{suffix}.p0", vector,
                                   [vector.as_pointer(), ir.IntType(32), mask_type, vector])
            masked_store = declared(f"llvm.masked.store.{suffix}.p0", ir.VoidType(),
                                    [vector, vector.as_pointer(), ir.IntType(32),
                                     mask_type])
            align = ir.Constant(ir.IntType(32), element)
            totals = [cgutils.alloca_once_value(builder, ir.Constant(vector, None))
                      for _ in range(sums)]
            chunks = builder.udiv(builder.add(n, ir.Constant(n.type, LANES - 1)),
                                  ir.Constant(n.type, LANES))
            with cgutils.for_range(builder, chunks) as loop:  # the last one masked to n
                k = builder.mul(loop.index, ir.Constant(n.type, LANES))
                mask = builder.icmp_unsigned(
                    "<", ir.Constant(ir.VectorType(n.type, LANES), list(range(LANES))),
                    splat(builder.sub(n, k)))
                terms = body(ops(
                    lambda i, k: builder.call(masked_load, [at(i, k), align, mask,
                                                            ir.Constant(vector, None)]),
                    lambda v, i, k: builder.call(masked_store,
                                                 [v, at(i, k), align, mask])),
                    k, scalars)
                for into, term in zip(totals, terms):
                    builder.store(builder.fadd(builder.load(into), term), into)
            results = [reduce(builder.load(into)) for into in totals]
        if not sums:
            return context.get_dummy_value()
        return context.make_tuple(builder, sig.return_type, results)

    return signature, codegen


class StateOps:
    """What a :func:`state_vectors` body builds with: ``load(i, k)`` and ``store(value, i,
    k)`` of one vector of array i's states from state k, ``fma``, ``splat``, ``const`` (a
    vector constant), the IR ``builder``, and :meth:`decay`."""

    def __init__(self, load, store, fused, splat, const, builder, kind, declared, suffix):
        self.load, self.store, self.fma, self.splat, self.const = load, store, fused, splat, const
        self.builder, self.kind, self.declared, self.suffix = builder, kind, declared, suffix

    def advance(self, dt, x, a, prev, b_row):
        """The scan's state step on one vector of states: (dec, h) with dec = decay(dt a) and
        h = dec prev + x b_row rounded once (x = dt u; dt, x scalars, the others vectors), the
        one code of the forward sweep and of the backward's recomputed states (bit for bit)."""
        dec = self.decay(self.builder.fmul(self.splat(dt), a))
        return dec, self.fma(dec, prev, self.builder.fmul(self.splat(x), b_row))

    def decay(self, x):
        """exp(x) for x <= 0 (a decay factor) on a vector, cheaper than :func:`exp`: its
        Cody-Waite reduction and polynomial (:data:`EXP_REDUCTION`) by fused multiply-adds,
        then one 2**k from bits; within 2 ulp of exp(x) where the result is a normal number, 0
        below that (exp(x) < 1.2e-38 in float32, 2.3e-308 in float64: a factor that has
        already wiped the state out); x > 0 is outside the contract (it gives 1), NaN stays
        NaN (the clamps are selects that keep a NaN, as numba's max and min do)."""
        b, c = self.builder, self.const
        lo, (ln2_hi, ln2_lo, coefficients) = DECAY_FLOOR[self.kind], EXP_REDUCTION[self.kind]
        bits, bias, shift = ((ir.IntType(32), 127, 23) if self.kind == types.float32
                             else (ir.IntType(64), 1023, 52))
        floor = self.declared(f"llvm.floor.{self.suffix}", x.type, [x.type])
        kept = b.select(b.fcmp_unordered("uge", x, c(lo)), x, c(lo))
        kept = b.select(b.fcmp_unordered("ule", kept, c(0.0)), kept, c(0.0))
        k = b.call(floor, [b.fadd(b.fmul(kept, c(LOG2_E)), c(0.5))])
        r = self.fma(k, c(-ln2_lo), self.fma(k, c(-ln2_hi), kept))
        p = c(coefficients[0])
        for coefficient in coefficients[1:]:
            p = self.fma(p, r, c(coefficient))
        e = b.fadd(self.fma(b.fmul(p, r), r, r), c(1.0))
        wide = ir.VectorType(bits, LANES)
        power = b.bitcast(b.shl(b.add(b.fptosi(k, wide), ir.Constant(wide, [bias] * LANES)),
                                ir.Constant(wide, [shift] * LANES)), x.type)
        return b.select(b.fcmp_ordered("olt", x, c(lo)), c(0.0), b.fmul(e, power))
