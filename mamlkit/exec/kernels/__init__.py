"""Faster CPU kernels for max-pooling and batch norm on NCHW tensors, with torch's numbers.

Why: on the CPU, torch's kernels for ``max_pool2d_with_indices`` and training-mode ``batch_norm`` on
contiguous (NCHW) tensors are scalar loops. On the first block of Conv4 with 15 queries per class
(a ``[75, 64, 28, 28]`` tensor, 1 thread) they take 20-25 ms and 8-11 ms, against ~1.5 and ~2.5 ms
for the same ops on a channels-last copy; with batch norm's backward they are about a quarter of a
second-order MAML iteration (benchmarks/RESULTS.md, issue 8 session 5). The peers (learn2learn,
higher, a plain loop) all run them. Converting to channels-last costs as much as it saves, so this
module compiles a few small C loops instead (with the system C compiler, once per process, in well
under a second) and routes ``F.max_pool2d`` and ``F.batch_norm`` to them while the per-task loop runs
(:func:`fast`): 6.4 and 4.7 ms on that tensor.

Max-pool of ReLU of batch norm (Conv4's block) also runs as one fused kernel from batch norm's input
(:class:`_BatchNormReLUMaxPool`): the mode fuses the backward when it sees the three calls in turn, and
:mod:`mamlkit.exec.kernels.fusion` the forward too, running the model's layers as a list (and a one-channel
convolution before the block as well). Its saved state is batch norm's
input, the pooled output and a byte per window, instead of three full-size tensors and int64 indices,
so a task's graph takes less memory as well.

The window loops run over a whole plane's outputs through a table of window starts, so that they
vectorise (gathers) with no data-dependent branch: row by row (14 outputs) they did not, and branches
on activations mispredict about half the time.

Exactness: the forward passes and batch norm's first-order backward are compiled. Every backward that
is itself differentiated (the inner loop's, under ``create_graph``) is torch's own
(``max_pool2d_with_indices_backward``, ``native_batch_norm_backward``) on the same saved tensors, so
second and higher derivatives are torch's too.

* Max-pooling returns the same values and the same indices as torch, bit for bit, ties and NaNs
  included (the first maximum of a window in row-major order; a NaN wins; tested).
* Batch norm sums in double, so its statistics differ from torch's in the last float32 bit
  (1e-7 relative), as any two summation orders do; in float64 the difference is ~1e-16.

Anything else (channels-last or non-contiguous tensors, padding, dilation, ceil mode, other dtypes,
tensors under :data:`MIN_ELEMENTS`, evaluation-mode batch norm, torch.func transforms,
``torch.compile``, autocast) goes to torch unchanged, and so does everything when no C compiler is
found (logged once).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import shutil
import string
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Hashable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

log = logging.getLogger("mamlkit")

_TEMPLATE = string.Template(r"""
/* Where each output's window starts in its plane: one table for all planes, so that the window loops run
   over a whole plane's outputs (OH * OW of them, not rows of OW = 14 that are too short for a vector),
   vectorised with gathers and branch-free (data-dependent branches mispredict on real activations). */
static $I* window_starts_${SFX}(int64_t W, int64_t sH, int64_t sW, int64_t OH, int64_t OW) {
  $I* start = ($I*)malloc(sizeof($I) * OH * OW);
  if (start)
    for (int64_t q = 0; q < OH * OW; q++) start[q] = ($I)((q / OW) * sH * W + (q % OW) * sW);
  return start;
}

void maxpool2d_${SFX}(const $T* x, $T* y, int64_t* idx, int64_t planes, int64_t H, int64_t W,
                   int64_t kH, int64_t kW, int64_t sH, int64_t sW, int64_t OH, int64_t OW, int nthreads) {
  const int64_t OHW = OH * OW;
  $I* start = (kH == 2 && kW == 2) ? window_starts_${SFX}(W, sH, sW, OH, OW) : 0;
  const $I w0 = ($I)W, w1 = ($I)W + 1;
  #pragma omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1)
  for (int64_t p = 0; p < planes; p++) {
    const $T* xp = x + p * H * W;
    $T* yp = y + p * OHW;
    int64_t* ip = idx + p * OHW;
    if (start) {
      /* the common 2x2 window; the same rule as below */
      #pragma omp simd
      for (int64_t q = 0; q < OHW; q++) {
        const $I b = start[q];
        $T m = xp[b], v;
        $I k = 0, t;
        v = xp[b + 1];  t = (v > m) | (v != v); m = t ? v : m; k = t ? 1 : k;
        v = xp[b + w0]; t = (v > m) | (v != v); m = t ? v : m; k = t ? w0 : k;
        v = xp[b + w1]; t = (v > m) | (v != v); m = t ? v : m; k = t ? w1 : k;
        yp[q] = m;
        ip[q] = (int64_t)(b + k);
      }
      continue;
    }
    for (int64_t oh = 0; oh < OH; oh++) {
      for (int64_t ow = 0; ow < OW; ow++) {
        /* torch's rule: scan the window row-major, take a value that is greater or NaN */
        int64_t h0 = oh * sH, w0 = ow * sW, best = h0 * W + w0;
        $T m = xp[best];
        for (int64_t h = h0; h < h0 + kH; h++)
          for (int64_t w = w0; w < w0 + kW; w++) {
            $T v = xp[h * W + w];
            if (v > m || v != v) { m = v; best = h * W + w; }
          }
        yp[oh * OW + ow] = m;
        ip[oh * OW + ow] = best;
      }
    }
  }
  free(start);
}

void batchnorm_${SFX}(const $T* x, $T* y, const $T* weight, const $T* bias, $T* save_mean, $T* save_invstd,
                   $T* running_mean, $T* running_var, int64_t N, int64_t C, int64_t HW, double eps,
                   double momentum, int nthreads) {
  const double count = (double)N * (double)HW;
  #pragma omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1)
  for (int64_t c = 0; c < C; c++) {
    /* one pass, shifted by the channel's first value so that var = E[d^2] - E[d]^2 does not cancel */
    const double shift = (double)x[c * HW];
    double sum = 0.0, sq = 0.0;
    for (int64_t n = 0; n < N; n++) {
      const $T* r = x + (n * C + c) * HW;
      #pragma omp simd reduction(+:sum, sq)
      for (int64_t i = 0; i < HW; i++) { double d = (double)r[i] - shift; sum += d; sq += d * d; }
    }
    const double dmean = sum / count, mean = shift + dmean;
    const double var = sq / count - dmean * dmean > 0.0 ? sq / count - dmean * dmean : 0.0;
    const $T invstd = ($T)(1.0 / sqrt(var + eps));
    /* as torch: y = x * alpha + beta with alpha = invstd * weight, beta = bias - mean * alpha */
    const $T alpha = weight ? invstd * weight[c] : invstd;
    const $T beta = (bias ? bias[c] : ($T)0) - ($T)mean * alpha;
    for (int64_t n = 0; n < N && y; n++) {  /* y == NULL: statistics only (mamlkit.exec.kernels.fusion) */
      const $T* r = x + (n * C + c) * HW;
      $T* o = y + (n * C + c) * HW;
      #pragma omp simd
      for (int64_t i = 0; i < HW; i++) o[i] = r[i] * alpha + beta;
    }
    save_mean[c] = ($T)mean;
    save_invstd[c] = invstd;
    if (running_mean) running_mean[c] = ($T)((1.0 - momentum) * running_mean[c] + momentum * mean);
    if (running_var) running_var[c] = ($T)((1.0 - momentum) * running_var[c] + momentum * var * count / (count - 1.0));
  }
}
void batchnorm_backward_${SFX}(const $T* gy, const $T* x, const $T* weight, const $T* mean, const $T* invstd,
                            $T* gx, $T* gw, $T* gb, int64_t N, int64_t C, int64_t HW, int nthreads) {
  const double count = (double)N * (double)HW;
  #pragma omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1)
  for (int64_t c = 0; c < C; c++) {
    const double m = (double)mean[c];
    double sum = 0.0, dot = 0.0;
    for (int64_t n = 0; n < N; n++) {
      const $T* g = gy + (n * C + c) * HW;
      const $T* r = x + (n * C + c) * HW;
      #pragma omp simd reduction(+:sum, dot)
      for (int64_t i = 0; i < HW; i++) { sum += (double)g[i]; dot += (double)g[i] * ((double)r[i] - m); }
    }
    const double s = (double)invstd[c];
    gb[c] = ($T)sum;
    gw[c] = ($T)(dot * s);
    if (!gx) continue;
    /* as torch: gx = (gy - mean(gy) - (x - mean) * dot * invstd^2 / count) * invstd * weight */
    const $T w = weight ? weight[c] : ($T)1;
    const $T gmean = ($T)(sum / count), proj = ($T)(dot * s * s / count), mu = mean[c], scale = ($T)s * w;
    for (int64_t n = 0; n < N; n++) {
      const $T* g = gy + (n * C + c) * HW;
      const $T* r = x + (n * C + c) * HW;
      $T* o = gx + (n * C + c) * HW;
      #pragma omp simd
      for (int64_t i = 0; i < HW; i++) o[i] = (g[i] - gmean - (r[i] - mu) * proj) * scale;
    }
  }
}

/* out = max_pool2d(relu(batch_norm(y))) from batch norm's input and batch statistics, in one pass over y.
   Per element the same float operations as batchnorm_ above, the window rule of maxpool2d_ on them, then
   relu (torch's clamp_min, which keeps NaN) of the maximum: relu(max z) = max relu(z), and where it is
   positive the first maximum of z is the first of relu(z), the only index the backward uses (relu's
   gradient is 0 elsewhere). Taking relu last keeps the loop vectorisable. off: the window-local index
   kh * kW + kw of each maximum. */
static void pool_plane_${SFX}(const $T* yp, const $I* start, $T alpha, $T beta, $T* op, uint8_t* fp, int64_t OHW,
                           int64_t Wp, int64_t kH, int64_t kW, int64_t sH, int64_t sW, int64_t OW) {
  /* one plane of max_pool2d(relu(y * alpha + beta)), its rows Wp apart, windows starting at start[q] */
  if (kH == 2 && kW == 2) {
    const $I w0 = ($I)Wp, w1 = ($I)Wp + 1;
    #pragma omp simd
    for (int64_t q = 0; q < OHW; q++) {
      const $I b = start[q];
      $T m = yp[b] * alpha + beta, v;
      $I k = 0, t;
      v = yp[b + 1] * alpha + beta;  t = (v > m) | (v != v); m = t ? v : m; k = t ? 1 : k;
      v = yp[b + w0] * alpha + beta; t = (v > m) | (v != v); m = t ? v : m; k = t ? 2 : k;
      v = yp[b + w1] * alpha + beta; t = (v > m) | (v != v); m = t ? v : m; k = t ? 3 : k;
      op[q] = m < 0 ? ($T)0 : m;
      fp[q] = (uint8_t)k;
    }
    return;
  }
  for (int64_t q = 0; q < OHW; q++) {
    const $T* x0 = yp + start[q];
    $T m = x0[0] * alpha + beta;
    int64_t k = 0;
    for (int64_t i = 0; i < kH; i++)
      for (int64_t j = 0; j < kW; j++) {
        $T v = x0[i * Wp + j] * alpha + beta;
        if (v > m || v != v) { m = v; k = i * kW + j; }
      }
    op[q] = m < 0 ? ($T)0 : m;
    fp[q] = (uint8_t)k;
  }
}
int bnrelupool_${SFX}(const $T* y, const $T* weight, const $T* bias, const $T* mean, const $T* invstd,
                    $T* out, uint8_t* off, int64_t planes, int64_t C, int64_t H, int64_t W, int64_t kH,
                    int64_t kW, int64_t sH, int64_t sW, int64_t OH, int64_t OW, int nthreads) {
  const int64_t OHW = OH * OW;
  $I* start = window_starts_${SFX}(W, sH, sW, OH, OW);
  if (!start) return 1;  /* out of memory */
  #pragma omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1)
  for (int64_t p = 0; p < planes; p++) {
    const int64_t c = p % C;
    const $T alpha = weight ? invstd[c] * weight[c] : invstd[c];
    const $T beta = (bias ? bias[c] : ($T)0) - mean[c] * alpha;
    pool_plane_${SFX}(y + p * H * W, start, alpha, beta, out + p * OHW, off + p * OHW, OHW, W, kH, kW, sH, sW, OW);
  }
  free(start);
  return 0;
}
/* The backward's per-plane pieces, shared by both fused blocks. The gradient reaches each window's
   maximum where the pooled output is positive (relu's result > 0). */
static void window_steps_${SFX}($I* step, int64_t kH, int64_t kW, int64_t rowstride) {
  /* window-local index -> offset from the window's start, so that no division runs per element */
  for (int64_t k = 0; k < kH * kW; k++) step[k] = ($I)((k / kW) * rowstride + k % kW);
}
static void window_sums_${SFX}(const $T* g, const $T* o, const uint8_t* f, const $T* yp, const $I* start,
                            const $I* step, int64_t OHW, double m, double* sum, double* dot) {
  /* batch norm's two backward sums over one plane: sum of dz and of dz * (y - mean) */
  double s = 0.0, d = 0.0;
  #pragma omp simd reduction(+:s, d)
  for (int64_t q = 0; q < OHW; q++) {
    const $T gq = o[q] > 0 ? g[q] : ($T)0;
    s += (double)gq;
    d += (double)gq * ((double)yp[start[q] + step[f[q]]] - m);
  }
  *sum += s;
  *dot += d;
}
static void window_grads_${SFX}($T* gz, int64_t len, const $T* g, const $T* o, const uint8_t* f, const $I* start,
                             const $I* step, int64_t OHW) {
  /* one plane of relu's input gradient dz: zero, plus each window's gradient at its maximum (summed
     where windows overlap) */
  memset(gz, 0, sizeof($T) * len);
  for (int64_t q = 0; q < OHW; q++) gz[start[q] + step[f[q]]] += o[q] > 0 ? g[q] : ($T)0;
}
/* Its first-order backward: the window pieces above, then batch norm's backward as batchnorm_backward_. */
int bnrelupool_backward_${SFX}(const $T* go, const $T* y, const $T* out, const uint8_t* off, const $T* weight,
                             const $T* mean, const $T* invstd, $T* gy, $T* gw, $T* gb, int64_t N, int64_t C,
                             int64_t H, int64_t W, int64_t kH, int64_t kW, int64_t sH, int64_t sW, int64_t OH,
                             int64_t OW, int nthreads) {
  const int64_t HW = H * W, OHW = OH * OW;
  const double count = (double)N * (double)HW;
  $I step[256];
  window_steps_${SFX}(step, kH, kW, W);
  $I* start = window_starts_${SFX}(W, sH, sW, OH, OW);
  int failed = !start;
  #pragma omp parallel num_threads(nthreads) if(nthreads > 1 && !failed)
  {
    $T* gz = gy && !failed ? ($T*)malloc(sizeof($T) * HW) : 0;  /* one plane of relu's input gradient */
    if (gy && !gz) failed = 1;
    #pragma omp for schedule(static)
    for (int64_t c = 0; c < C; c++) {
      if (!start || (gy && !gz)) continue;
      const $T m = mean[c];
      double sum = 0.0, dot = 0.0;
      for (int64_t n = 0; n < N; n++) {
        const int64_t p = n * C + c;
        window_sums_${SFX}(go + p * OHW, out + p * OHW, off + p * OHW, y + p * HW, start, step, OHW, m, &sum, &dot);
      }
      const double s = (double)invstd[c];
      gb[c] = ($T)sum;
      gw[c] = ($T)(dot * s);
      if (!gy) continue;
      const $T w = weight ? weight[c] : ($T)1;
      const $T gmean = ($T)(sum / count), proj = ($T)(dot * s * s / count), mu = m, scale = ($T)s * w;
      for (int64_t n = 0; n < N; n++) {
        const int64_t p = n * C + c;
        const $T* yp = y + p * HW;
        $T* gp = gy + p * HW;
        window_grads_${SFX}(gz, HW, go + p * OHW, out + p * OHW, off + p * OHW, start, step, OHW);
        #pragma omp simd
        for (int64_t i = 0; i < HW; i++) gp[i] = (gz[i] - gmean - (yp[i] - mu) * proj) * scale;
      }
    }
    free(gz);
  }
  free(start);
  return failed;
}

/* Conv (one input channel, stride 1, zero padding) -> batch norm -> relu -> max-pool, with the convolution
   recomputed per plane from the small input instead of stored. Conv outputs live in a per-thread plane
   buffer in "padded width" layout: row h at h * Wp, with Wp = W + 2 pW, so that one flat loop over
   H1 * Wp positions computes them all (the columns from W1 on are not used). */
static $T* pad_images_${SFX}(const $T* x, int64_t N, int64_t H, int64_t W, int64_t pH, int64_t pW, int64_t slack) {
  const int64_t Hp = H + 2 * pH, Wp = W + 2 * pW;
  $T* xp = ($T*)calloc(N * Hp * Wp + slack, sizeof($T));
  if (xp)
    for (int64_t n = 0; n < N; n++)
      for (int64_t h = 0; h < H; h++)
        memcpy(xp + n * Hp * Wp + (h + pH) * Wp + pW, x + (n * H + h) * W, sizeof($T) * W);
  return xp;
}
static void conv_plane_${SFX}(const $T* xp, const $T* k, $T b, $T* y, int64_t len, int64_t Wp, int64_t kH, int64_t kW) {
  if (kH == 3 && kW == 3) {  /* Conv4's 3x3: the nine taps in registers, one pass */
    const $T k0 = k[0], k1 = k[1], k2 = k[2], k3 = k[3], k4 = k[4], k5 = k[5], k6 = k[6], k7 = k[7], k8 = k[8];
    const $T *r0 = xp, *r1 = xp + Wp, *r2 = xp + 2 * Wp;
    #pragma omp simd
    for (int64_t i = 0; i < len; i++)
      y[i] = b + k0 * r0[i] + k1 * r0[i + 1] + k2 * r0[i + 2] + k3 * r1[i] + k4 * r1[i + 1] + k5 * r1[i + 2]
               + k6 * r2[i] + k7 * r2[i + 1] + k8 * r2[i + 2];
    return;
  }
  #pragma omp simd
  for (int64_t i = 0; i < len; i++) y[i] = b;
  for (int64_t a = 0; a < kH; a++)
    for (int64_t c = 0; c < kW; c++) {
      const $T kv = k[a * kW + c];
      const $T* src = xp + a * Wp + c;
      #pragma omp simd
      for (int64_t i = 0; i < len; i++) y[i] += kv * src[i];
    }
}
int convbnrelupool_${SFX}(const $T* x, const $T* cw, const $T* cb, const $T* weight, const $T* bias,
                       $T* save_mean, $T* save_invstd, $T* running_mean, $T* running_var, $T* out, uint8_t* off,
                       int64_t N, int64_t C, int64_t H, int64_t W, int64_t kH, int64_t kW, int64_t pH, int64_t pW,
                       int64_t pkH, int64_t pkW, int64_t psH, int64_t psW, int64_t OH, int64_t OW, double eps,
                       double momentum, int nthreads) {
  const int64_t Hp = H + 2 * pH, Wp = W + 2 * pW, H1 = Hp - kH + 1, W1 = Wp - kW + 1, len = H1 * Wp, OHW = OH * OW;
  const double count = (double)N * (double)(H1 * W1);
  $T* xp = pad_images_${SFX}(x, N, H, W, pH, pW, Wp + kW);
  $I* start = window_starts_${SFX}(Wp, psH, psW, OH, OW);
  int failed = !xp || !start;
  #pragma omp parallel num_threads(nthreads) if(nthreads > 1 && !failed)
  {
    $T* y = failed ? 0 : ($T*)malloc(sizeof($T) * len);
    if (!y) failed = 1;
    #pragma omp for schedule(static)
    for (int64_t c = 0; c < C; c++) {
      if (!y) continue;
      const $T* k = cw + c * kH * kW;
      const $T b = cb ? cb[c] : ($T)0;
      double shift = 0.0, sum = 0.0, sq = 0.0;
      for (int64_t n = 0; n < N; n++) {
        conv_plane_${SFX}(xp + n * Hp * Wp, k, b, y, len, Wp, kH, kW);
        if (n == 0) shift = (double)y[0];  /* as batchnorm_: shifted sums */
        for (int64_t h = 0; h < H1; h++) {
          const $T* r = y + h * Wp;
          #pragma omp simd reduction(+:sum, sq)
          for (int64_t i = 0; i < W1; i++) { double d = (double)r[i] - shift; sum += d; sq += d * d; }
        }
      }
      const double dmean = sum / count, mean = shift + dmean;
      const double var = sq / count - dmean * dmean > 0.0 ? sq / count - dmean * dmean : 0.0;
      const $T invstd = ($T)(1.0 / sqrt(var + eps));
      save_mean[c] = ($T)mean;
      save_invstd[c] = invstd;
      if (running_mean) running_mean[c] = ($T)((1.0 - momentum) * running_mean[c] + momentum * mean);
      if (running_var)
        running_var[c] = ($T)((1.0 - momentum) * running_var[c] + momentum * var * count / (count - 1.0));
      const $T alpha = weight ? invstd * weight[c] : invstd;
      const $T beta = (bias ? bias[c] : ($T)0) - ($T)mean * alpha;
      for (int64_t n = 0; n < N; n++) {
        conv_plane_${SFX}(xp + n * Hp * Wp, k, b, y, len, Wp, kH, kW);
        pool_plane_${SFX}(y, start, alpha, beta, out + (n * C + c) * OHW, off + (n * C + c) * OHW, OHW, Wp,
                          pkH, pkW, psH, psW, OW);
      }
    }
    free(y);
  }
  free(xp);
  free(start);
  return failed;
}
/* Its first-order backward: batch norm's and the convolution's weight and bias gradients; the gradient
   with respect to the conv output is formed one plane at a time and never stored. */
int convbnrelupool_backward_${SFX}(const $T* go, const $T* x, const $T* cw, const $T* cb, const $T* out,
                                const uint8_t* off, const $T* weight, const $T* mean, const $T* invstd, $T* gcw,
                                $T* gcb, $T* gw, $T* gb, int64_t N, int64_t C, int64_t H, int64_t W, int64_t kH,
                                int64_t kW, int64_t pH, int64_t pW, int64_t pkH, int64_t pkW, int64_t psH,
                                int64_t psW, int64_t OH, int64_t OW, int nthreads) {
  const int64_t Hp = H + 2 * pH, Wp = W + 2 * pW, H1 = Hp - kH + 1, W1 = Wp - kW + 1, len = H1 * Wp, OHW = OH * OW;
  const double count = (double)N * (double)(H1 * W1);
  $T* xp = pad_images_${SFX}(x, N, H, W, pH, pW, Wp + kW);
  $I* start = window_starts_${SFX}(Wp, psH, psW, OH, OW);
  $I step[256];
  window_steps_${SFX}(step, pkH, pkW, Wp);
  int failed = !xp || !start;
  #pragma omp parallel num_threads(nthreads) if(nthreads > 1 && !failed)
  {
    $T* y = failed ? 0 : ($T*)malloc(sizeof($T) * 2 * len);
    if (!y) failed = 1;
    $T* gz = y + len;
    double acc[65];  /* the channel's kH * kW weight gradients and its bias gradient, summed over planes */
    #pragma omp for schedule(static)
    for (int64_t c = 0; c < C; c++) {
      if (!y) continue;
      const $T* k = cw + c * kH * kW;
      const $T b = cb ? cb[c] : ($T)0;
      const $T m = mean[c];
      double sum = 0.0, dot = 0.0;
      for (int64_t n = 0; n < N; n++) {
        const int64_t p = n * C + c;
        conv_plane_${SFX}(xp + n * Hp * Wp, k, b, y, len, Wp, kH, kW);
        window_sums_${SFX}(go + p * OHW, out + p * OHW, off + p * OHW, y, start, step, OHW, m, &sum, &dot);
      }
      const double s = (double)invstd[c];
      gb[c] = ($T)sum;
      gw[c] = ($T)(dot * s);
      const $T w = weight ? weight[c] : ($T)1;
      const $T gmean = ($T)(sum / count), proj = ($T)(dot * s * s / count), mu = m, scale = ($T)s * w;
      for (int64_t t = 0; t <= kH * kW; t++) acc[t] = 0.0;
      for (int64_t n = 0; n < N; n++) {
        const int64_t p = n * C + c;
        const $T* xn = xp + n * Hp * Wp;
        conv_plane_${SFX}(xn, k, b, y, len, Wp, kH, kW);
        window_grads_${SFX}(gz, len, go + p * OHW, out + p * OHW, off + p * OHW, start, step, OHW);
        for (int64_t h = 0; h < H1; h++) {  /* gz becomes the conv output's gradient (0 off the image) */
          $T* r = gz + h * Wp;
          const $T* yr = y + h * Wp;
          #pragma omp simd
          for (int64_t i = 0; i < W1; i++) r[i] = (r[i] - gmean - (yr[i] - mu) * proj) * scale;
          for (int64_t i = W1; i < Wp; i++) r[i] = 0;
        }
        $T bsum = 0;
        if (kH == 3 && kW == 3) {  /* the nine weight gradients and the bias's in one pass */
          const $T *r0 = xn, *r1 = xn + Wp, *r2 = xn + 2 * Wp;
          $T d0 = 0, d1 = 0, d2 = 0, d3 = 0, d4 = 0, d5 = 0, d6 = 0, d7 = 0, d8 = 0;
          #pragma omp simd reduction(+:bsum, d0, d1, d2, d3, d4, d5, d6, d7, d8)
          for (int64_t i = 0; i < len; i++) {
            const $T v = gz[i];
            bsum += v;
            d0 += v * r0[i]; d1 += v * r0[i + 1]; d2 += v * r0[i + 2];
            d3 += v * r1[i]; d4 += v * r1[i + 1]; d5 += v * r1[i + 2];
            d6 += v * r2[i]; d7 += v * r2[i + 1]; d8 += v * r2[i + 2];
          }
          acc[0] += d0; acc[1] += d1; acc[2] += d2; acc[3] += d3; acc[4] += d4;
          acc[5] += d5; acc[6] += d6; acc[7] += d7; acc[8] += d8; acc[9] += bsum;
          continue;
        }
        #pragma omp simd reduction(+:bsum)
        for (int64_t i = 0; i < len; i++) bsum += gz[i];
        acc[kH * kW] += (double)bsum;
        for (int64_t a = 0; a < kH; a++)
          for (int64_t cc = 0; cc < kW; cc++) {
            const $T* src = xn + a * Wp + cc;
            $T d = 0;
            #pragma omp simd reduction(+:d)
            for (int64_t i = 0; i < len; i++) d += gz[i] * src[i];
            acc[a * kW + cc] += (double)d;
          }
      }
      for (int64_t t = 0; t < kH * kW; t++) gcw[c * kH * kW + t] = ($T)acc[t];
      if (gcb) gcb[c] = ($T)acc[kH * kW];
    }
    free(y);
  }
  free(xp);
  free(start);
  return failed;
}
""")
_SOURCE = "#include <math.h>\n#include <stdint.h>\n#include <stdlib.h>\n#include <string.h>\n" + "".join(
    _TEMPLATE.substitute(T=t, I=i, SFX=sfx)
    # $I: the window-offset type, as wide as $T so that one vector holds both (gathers need that)
    for t, i, sfx in (("float", "int32_t", "f32"), ("double", "int64_t", "f64")))
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_I64, _INT, _DBL, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p

_enabled = os.environ.get("MAMLKIT_FAST_KERNELS", "1") != "0"
_lib: ctypes.CDLL | None | bool = False  # False: not built yet; None: unavailable
_lib_lock = threading.Lock()


def set_enabled(flag: bool) -> None:
    """Turn the fast kernels on or off for this process (``mamlkit train --no-fast-kernels``)."""
    global _enabled
    _enabled = bool(flag)


def available() -> bool:
    """Whether the kernels are enabled and compiled (compiles them on the first call)."""
    return _enabled and _library() is not None


def _library() -> ctypes.CDLL | None:
    global _lib
    if _lib is False:
        with _lib_lock:
            if _lib is False:
                _lib = _build()
    return _lib  # type: ignore[return-value]


def _build() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("mamlkit: no C compiler found; max-pool and batch norm use torch's slower NCHW CPU kernels")
        return None
    tmp = tempfile.mkdtemp(prefix="mamlkit-kernels-")
    try:
        src, lib = os.path.join(tmp, "kernels.c"), os.path.join(tmp, "kernels.so")
        with open(src, "w") as f:
            f.write(_SOURCE)
        # -march=native: built on the machine it runs on, in this process. Falls back to a portable build.
        # -fopenmp links libgomp.so.1, which resolves to the copy torch has already loaded: one thread pool.
        for arch in (["-march=native"], []):
            proc = subprocess.run([cc, "-O3", *arch, "-fopenmp", "-shared", "-fPIC", src, "-o", lib],
                                  capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                break
        else:
            log.info("mamlkit: building the fast CPU kernels failed (%s); using torch's",
                     proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else proc.returncode)
            return None
        handle = ctypes.CDLL(lib)
        for sfx in _SUFFIX.values():
            getattr(handle, f"maxpool2d_{sfx}").argtypes = [_PTR] * 3 + [_I64] * 9 + [_INT]
            getattr(handle, f"batchnorm_{sfx}").argtypes = [_PTR] * 8 + [_I64] * 3 + [_DBL, _DBL, _INT]
            getattr(handle, f"batchnorm_backward_{sfx}").argtypes = [_PTR] * 8 + [_I64] * 3 + [_INT]
            getattr(handle, f"bnrelupool_{sfx}").argtypes = [_PTR] * 7 + [_I64] * 10 + [_INT]
            getattr(handle, f"bnrelupool_backward_{sfx}").argtypes = [_PTR] * 10 + [_I64] * 10 + [_INT]
            getattr(handle, f"bnrelupool_{sfx}").restype = _INT
            getattr(handle, f"bnrelupool_backward_{sfx}").restype = _INT
            getattr(handle, f"convbnrelupool_{sfx}").restype = _INT
            getattr(handle, f"convbnrelupool_backward_{sfx}").restype = _INT
            getattr(handle, f"convbnrelupool_{sfx}").argtypes = [_PTR] * 11 + [_I64] * 14 + [_DBL, _DBL, _INT]
            getattr(handle, f"convbnrelupool_backward_{sfx}").argtypes = [_PTR] * 13 + [_I64] * 14 + [_INT]
        return handle
    except (OSError, subprocess.SubprocessError) as err:
        log.info("mamlkit: fast CPU kernels unavailable (%s); using torch's", err)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the loaded library stays mapped


def _kernel(name: str, dtype: torch.dtype) -> ctypes._CFuncPtr:
    """The compiled ``name`` for ``dtype`` (float32 or float64)."""
    return getattr(_library(), f"{name}_{_SUFFIX[dtype]}")


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _ncl(x: Tensor) -> tuple[int, int, int]:
    """Batch, channels and elements per channel plane of an NCHW tensor."""
    n, c = x.shape[:2]
    return n, c, x.numel() // (n * c)


def _threads() -> int:
    return torch.get_num_threads()


class _MaxPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, kernel: tuple[int, int], stride: tuple[int, int]):
        n, c, h, w = x.shape
        oh, ow = (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1
        y = x.new_empty((n, c, oh, ow))
        idx = torch.empty((n, c, oh, ow), dtype=torch.int64)
        _kernel("maxpool2d", x.dtype)(
            x.data_ptr(), y.data_ptr(), idx.data_ptr(), n * c, h, w, *kernel, *stride, oh, ow, _threads())
        ctx.save_for_backward(x, idx)
        ctx.kernel, ctx.stride = kernel, stride
        ctx.mark_non_differentiable(idx)
        return y, idx

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_idx: Tensor | None):
        x, idx = ctx.saved_tensors
        # torch's own backward, so its double backward (a gather at idx) is torch's as well
        gx = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, list(ctx.kernel), list(ctx.stride),
                                                              [0, 0], [1, 1], False, idx)
        return gx, None, None


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                running_var: Tensor | None, momentum: float, eps: float):
        n, c, hw = _ncl(x)
        mean, invstd = x.new_empty(c), x.new_empty(c)  # small ones first, as torch does (less fragmentation)
        y = torch.empty_like(x)
        _kernel("batchnorm", x.dtype)(
            x.data_ptr(), y.data_ptr(), _ptr(weight), _ptr(bias), mean.data_ptr(), invstd.data_ptr(),
            _ptr(running_mean), _ptr(running_var), n, c, hw, float(eps), float(momentum), _threads())
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)
        return y, mean, invstd  # the statistics, for the fused block below

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_mean: Tensor | None, _grad_invstd: Tensor | None):
        x, weight, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # create_graph (the inner loop's gradient): torch's own backward, which is differentiable (its
            # double backward is batchnorm_double_backward), on the same saved tensors as torch's layer
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                grad, x, weight, None, None, mean, invstd, True, ctx.eps,
                [need[0], weight is not None and need[1], need[2]])
            return gx, gw, gb, None, None, None, None
        # a first-order backward (the outer one): the same formula, compiled
        grad = grad.contiguous()
        n, c, hw = _ncl(x)
        gw, gb = x.new_empty(c), x.new_empty(c)
        gx = torch.empty_like(x) if need[0] else None
        _kernel("batchnorm_backward", x.dtype)(
            grad.data_ptr(), x.data_ptr(), _ptr(weight), mean.data_ptr(), invstd.data_ptr(), _ptr(gx),
            gw.data_ptr(), gb.data_ptr(), n, c, hw, _threads())
        return (gx, gw if weight is not None and need[1] else None, gb if need[2] else None,
                None, None, None, None)


class _BatchNormReLUMaxPool(torch.autograd.Function):
    """``max_pool2d(relu(batch_norm(y)))`` from batch norm's input ``y`` and the batch statistics its forward
    computed: one pass over ``y`` forward and a sparse one plus a dense one backward, instead of the eight
    passes over ``[N, C, H, W]`` tensors that the three ops make one by one (the first block of Conv4)."""

    @staticmethod
    def forward(ctx, y: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor,
                eps: float, kernel: tuple[int, int], stride: tuple[int, int]):
        n, c, h, w = y.shape
        oh, ow = (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1
        off = torch.empty((n, c, oh, ow), dtype=torch.uint8)  # window-local argmax: 1 byte, not torch's 8
        out = y.new_empty((n, c, oh, ow))
        if _kernel("bnrelupool", y.dtype)(
                y.data_ptr(), _ptr(weight), _ptr(bias), mean.data_ptr(), invstd.data_ptr(), out.data_ptr(),
                off.data_ptr(), n * c, c, h, w, *kernel, *stride, oh, ow, _threads()):
            raise MemoryError("mamlkit.exec.kernels: out of memory in the fused block")
        ctx.save_for_backward(y, weight, mean, invstd, out, off)
        ctx.eps, ctx.kernel, ctx.stride = eps, kernel, stride
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        y, weight, mean, invstd, out, off = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], weight is not None and need[1], need[2]]
        if torch.is_grad_enabled():
            gy, gw, gb = _block_backward_by_torch(grad, y, weight, mean, invstd, out, off, ctx, mask)
            return gy, gw, gb, None, None, None, None, None
        grad = grad.contiguous()
        n, c, h, w = y.shape
        gw, gb = y.new_empty(c), y.new_empty(c)
        gy = torch.empty_like(y) if need[0] else None
        if _kernel("bnrelupool_backward", y.dtype)(
                grad.data_ptr(), y.data_ptr(), out.data_ptr(), off.data_ptr(), _ptr(weight), mean.data_ptr(),
                invstd.data_ptr(), _ptr(gy), gw.data_ptr(), gb.data_ptr(), n, c, h, w, *ctx.kernel, *ctx.stride,
                out.shape[2], out.shape[3], _threads()):
            raise MemoryError("mamlkit.exec.kernels: out of memory in the fused block's backward")
        return gy, gw if mask[1] else None, gb if need[2] else None, None, None, None, None, None


def batch_norm_relu_max_pool(y: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor,
                             eps: float, kernel: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """``max_pool2d(relu(batch_norm(y)))`` in training mode, from ``y`` ``[N, C, H, W]`` (contiguous CPU float)
    and its batch statistics ``mean`` and ``invstd`` ``[C]`` (as constants: the backward differentiates
    through them); returns ``[N, C, OH, OW]``. Derivatives of every order, first-order backward compiled."""
    return _BatchNormReLUMaxPool.apply(y, weight, bias, mean, invstd, eps, kernel, stride)


class _ConvBatchNormReLUMaxPool(torch.autograd.Function):
    """``max_pool2d(relu(batch_norm(conv2d(x))))`` for a one-channel ``x`` (stride 1, zero padding): the
    convolution is recomputed per plane wherever it is needed (9 multiply-adds per element for 3×3), so
    the ``[N, C, H, W]`` conv output is neither stored nor read. Batch statistics and the running-stat
    update as ``F.batch_norm`` in training mode. ``x`` takes no gradient (the caller checks)."""

    @staticmethod
    def forward(ctx, x: Tensor, cw: Tensor, cb: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, momentum: float, eps: float,
                padding: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int]):
        n, _, h, w = x.shape
        c, kh, kw = cw.shape[0], cw.shape[2], cw.shape[3]
        h1, w1 = h + 2 * padding[0] - kh + 1, w + 2 * padding[1] - kw + 1
        oh, ow = (h1 - kernel[0]) // stride[0] + 1, (w1 - kernel[1]) // stride[1] + 1
        mean, invstd = x.new_empty(c), x.new_empty(c)
        off = torch.empty((n, c, oh, ow), dtype=torch.uint8)
        out = x.new_empty((n, c, oh, ow))
        cw = cw.contiguous()
        if _kernel("convbnrelupool", x.dtype)(
                x.data_ptr(), cw.data_ptr(), _ptr(cb), _ptr(weight), _ptr(bias), mean.data_ptr(), invstd.data_ptr(),
                _ptr(running_mean), _ptr(running_var), out.data_ptr(), off.data_ptr(), n, c, h, w, kh, kw,
                *padding, *kernel, *stride, oh, ow, float(eps), float(momentum), _threads()):
            raise MemoryError("mamlkit.exec.kernels: out of memory in the fused conv block")
        ctx.save_for_backward(x, cw, cb, weight, mean, invstd, out, off)
        ctx.eps, ctx.padding, ctx.kernel, ctx.stride = eps, padding, kernel, stride
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, cw, cb, weight, mean, invstd, out, off = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # create_graph: torch's own differentiable ops, on the conv output recomputed by torch
            y = F.conv2d(x, cw, cb, padding=ctx.padding)
            gy, gw, gb = _block_backward_by_torch(grad, y, weight, mean, invstd, out, off, ctx,
                                                  [True, weight is not None and need[3], need[4]])
            _, gcw, gcb = torch.ops.aten.convolution_backward(
                gy, x, cw, None if cb is None else [cw.shape[0]], [1, 1], list(ctx.padding), [1, 1], False, [0, 0], 1,
                [False, need[1], cb is not None and need[2]])
            return None, gcw, gcb, gw, gb, None, None, None, None, None, None, None
        grad = grad.contiguous()
        n, _, h, w = x.shape
        c = cw.shape[0]
        gcw, gw, gb = torch.empty_like(cw), x.new_empty(c), x.new_empty(c)
        gcb = x.new_empty(c) if cb is not None else None
        if _kernel("convbnrelupool_backward", x.dtype)(
                grad.data_ptr(), x.data_ptr(), cw.data_ptr(), _ptr(cb), out.data_ptr(), off.data_ptr(), _ptr(weight),
                mean.data_ptr(), invstd.data_ptr(), gcw.data_ptr(), _ptr(gcb), gw.data_ptr(), gb.data_ptr(), n, c, h,
                w, cw.shape[2], cw.shape[3], *ctx.padding, *ctx.kernel, *ctx.stride, out.shape[2], out.shape[3],
                _threads()):
            raise MemoryError("mamlkit.exec.kernels: out of memory in the fused conv block's backward")
        return (None, gcw if need[1] else None, gcb if need[2] else None,
                gw if weight is not None and need[3] else None, gb if need[4] else None,
                None, None, None, None, None, None, None)


def conv_fusable(x: Tensor, conv: torch.nn.Conv2d) -> bool:
    """Whether :func:`conv_batch_norm_relu_max_pool` covers ``conv`` on ``x``: one input channel, stride 1,
    zero padding given as numbers, no dilation or groups, a kernel of at most 64 taps, an input that
    takes no gradient, and an output of :data:`MIN_ELEMENTS` or more."""
    w = conv.weight
    if not (type(conv) is torch.nn.Conv2d and conv.in_channels == 1 and conv.groups == 1 and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.kernel_size[0] * conv.kernel_size[1] <= 64 and type(x) is torch.Tensor
            and x.device.type == "cpu" and x.dtype in _SUFFIX and x.dim() == 4 and x.shape[1] == 1
            and x.is_contiguous() and not x.requires_grad and w.dtype == x.dtype and w.device == x.device
            and (conv.bias is None or (conv.bias.dtype == x.dtype and conv.bias.is_contiguous()))
            and _outside_transforms()):
        return False
    shape = conv_output_shape(x, conv)
    return min(shape) > 0 and shape[0] * shape[1] * shape[2] * shape[3] >= MIN_ELEMENTS


def conv_output_shape(x: Tensor, conv: torch.nn.Conv2d) -> tuple[int, int, int, int]:
    """``conv(x)``'s shape for stride 1 and numeric padding."""
    (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
    return x.shape[0], conv.out_channels, x.shape[2] + 2 * ph - kh + 1, x.shape[3] + 2 * pw - kw + 1


def conv_batch_norm_relu_max_pool(x: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, padding: tuple[int, int],
                                  weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                                  running_var: Tensor | None, momentum: float, eps: float, kernel: tuple[int, int],
                                  stride: tuple[int, int]) -> Tensor:
    """``max_pool2d(relu(batch_norm(conv2d(x, conv_weight, conv_bias, padding=padding))))`` in training mode,
    ``x`` ``[N, 1, H, W]`` -> ``[N, C, OH, OW]``, in one compiled kernel (see :func:`conv_fusable`)."""
    return _ConvBatchNormReLUMaxPool.apply(x, conv_weight, conv_bias, weight, bias, running_mean, running_var,
                                           momentum, eps, tuple(padding), kernel, stride)


def batch_stats(y: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                eps: float) -> tuple[Tensor, Tensor]:
    """Training-mode batch norm's statistics of ``y`` ``[N, C, H, W]``: ``(mean, invstd)`` ``[C]``, with the
    running statistics updated as ``F.batch_norm`` does (``var`` unbiased there); no output written."""
    mean, invstd = y.new_empty(y.shape[1]), y.new_empty(y.shape[1])
    _kernel("batchnorm", y.dtype)(
        y.data_ptr(), None, None, None, mean.data_ptr(), invstd.data_ptr(), _ptr(running_mean), _ptr(running_var),
        *_ncl(y), float(eps), float(momentum), _threads())
    return mean, invstd


def _block_backward_by_torch(grad: Tensor, y: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor,
                             out: Tensor, off: Tensor, ctx, mask: list[bool]) -> tuple[Tensor, ...]:
    """The fused block's backward under create_graph: torch's own differentiable backwards of max-pool and
    batch norm (``ctx`` holds kernel, stride and eps). Masking the pooled gradient by ``out > 0`` is
    ReLU's backward (threshold_backward on its result), as the gradient reaches only the window maxima,
    where ReLU's result is ``out``. Returns batch norm's ``(d y, d weight, d bias)``."""
    idx = _plane_index(off, ctx.kernel, ctx.stride, y.shape[3])
    gz = torch.ops.aten.max_pool2d_with_indices_backward(
        grad * (out > 0), y, list(ctx.kernel), list(ctx.stride), [0, 0], [1, 1], False, idx)
    return torch.ops.aten.native_batch_norm_backward(gz, y, weight, None, None, mean, invstd, True, ctx.eps, mask)


def _plane_index(off: Tensor, kernel: tuple[int, int], stride: tuple[int, int], width: int) -> Tensor:
    """torch's max-pool indices (row-major within each plane, int64) from window-local offsets."""
    oh, ow = off.shape[2:]
    off = off.long()
    rows = torch.arange(oh).mul_(stride[0]).view(oh, 1) + off // kernel[1]
    cols = torch.arange(ow).mul_(stride[1]) + off % kernel[1]
    return rows * width + cols


def _pair(v, default) -> tuple[int, int] | None:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    if isinstance(v, int):
        return v, v
    if isinstance(v, (list, tuple)) and len(v) in (1, 2) and all(isinstance(i, int) for i in v):
        return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])
    return None


# Below this many elements torch's kernels take tens of microseconds, about what the autograd.Function
# around a compiled kernel costs in Python, and under the threads strategy that Python time holds the GIL:
# on Omniglot 5w1s (stride-2 Conv4, [5, 64, 14, 14] activations) routing every batch norm slowed threads
# to 0.75× (benchmarks/RESULTS.md, issue 8 session 5).
MIN_ELEMENTS = 2**18


def _plain(x: object) -> bool:
    """A tensor this module handles: a contiguous 4-d float32/float64 CPU tensor, outside any transform."""
    return (type(x) in (torch.Tensor, torch.nn.Parameter) and x.device.type == "cpu" and x.dtype in _SUFFIX
            and x.dim() == 4 and x.is_contiguous() and x.numel() >= MIN_ELEMENTS)


@dataclasses.dataclass
class _Norm:
    """The last batch norm a mode routed, and relu's result on its output: what a max-pool of that result
    needs to run as one :class:`_BatchNormReLUMaxPool`. Weak references, so no tensor lives longer; the
    versions make sure that nothing was changed in place in between."""

    out: weakref.ref
    out_version: int
    input: weakref.ref
    input_version: int
    weight: Tensor | None
    bias: Tensor | None
    param_versions: tuple[int, ...]
    mean: Tensor
    invstd: Tensor
    eps: float
    relu: weakref.ref | None = None
    relu_version: int = -1

    def fused_input(self, x: Tensor) -> Tensor | None:
        """Batch norm's input, if ``x`` is still relu's unchanged result on this batch norm's output."""
        y = self.input()
        if (self.relu is None or self.relu() is not x or x._version != self.relu_version or y is None
                or y._version != self.input_version or _versions(self.weight, self.bias) != self.param_versions):
            return None
        return y


def _versions(*ts: Tensor | None) -> tuple[int, ...]:
    return tuple(t._version for t in ts if t is not None)


def _max_pool2d(mode, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                return_indices=False):
    kernel, step = _pair(kernel_size, None), _pair(stride, kernel_size)
    if not (_plain(input) and kernel and step and _pair(padding, 0) == (0, 0) and _pair(dilation, 1) == (1, 1)
            and not ceil_mode and min(*kernel, *step) > 0 and input.shape[2] >= kernel[0]
            and input.shape[3] >= kernel[1]):
        return NotImplemented
    norm = mode.norm
    if not return_indices and norm is not None and kernel[0] * kernel[1] <= 256:
        y = norm.fused_input(input)
        if y is not None:
            return batch_norm_relu_max_pool(y, norm.weight, norm.bias, norm.mean, norm.invstd, norm.eps,
                                            kernel, step)
    y, idx = _MaxPool2d.apply(input, kernel, step)
    return (y, idx) if return_indices else y


def _max_pool2d_with_indices(mode, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                             return_indices=True):
    return _max_pool2d(mode, input, kernel_size, stride, padding, dilation, ceil_mode, True)


def _batch_norm(mode, input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                eps=1e-5):
    tensors = [t for t in (weight, bias, running_mean, running_var) if t is not None]
    if not (training and _plain(input) and input.shape[0] * input.shape[2] * input.shape[3] > 1
            and isinstance(momentum, (int, float)) and isinstance(eps, (int, float))
            and all(t.dtype == input.dtype and t.device.type == "cpu" and t.dim() == 1 and t.is_contiguous()
                    and t.numel() == input.shape[1] for t in tensors)):
        return NotImplemented
    out, mean, invstd = _BatchNorm.apply(input, weight, bias, running_mean, running_var, momentum, eps)
    mode.norm = _Norm(weakref.ref(out), out._version, weakref.ref(input), input._version, weight, bias,
                      _versions(weight, bias), mean, invstd, float(eps))
    return out


def _torch_batch_norm(mode, input, weight, bias, running_mean, running_var, training, momentum, eps, *rest):
    return _batch_norm(mode, input, running_mean, running_var, weight, bias, training, momentum, eps)


_FAST = {
    F.max_pool2d: _max_pool2d,
    F.max_pool2d_with_indices: _max_pool2d_with_indices,
    F.batch_norm: _batch_norm,
    torch.batch_norm: _torch_batch_norm,
}
_RELU = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}


class FastKernels(TorchFunctionMode):
    """Route ``F.max_pool2d`` and ``F.batch_norm`` (training mode) on NCHW CPU tensors to the compiled
    kernels of this module, and a max-pool of a relu of such a batch norm to the fused block; everything
    else runs unchanged. Enter it through :func:`fast`."""

    def __init__(self) -> None:
        super().__init__()
        self.hits = 0
        self.norm: _Norm | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = _FAST.get(func)
        if impl is not None and _outside_transforms():
            out = impl(self, *args, **kwargs)
            if out is not NotImplemented:
                self.hits += 1
                return out
        norm = self.norm
        # relu of the last batch norm's unchanged output (checked before an in-place relu bumps its version)
        after_norm = (func in _RELU and norm is not None and len(args) > 0 and args[0] is norm.out()
                      and args[0]._version == norm.out_version)
        out = func(*args, **kwargs)
        if after_norm and type(out) in (torch.Tensor, torch.nn.Parameter):
            norm.relu, norm.relu_version = weakref.ref(out), out._version
        return out


def _outside_transforms() -> bool:
    return (torch._C._functorch.maybe_current_level() is None and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu"))


# Whether code run under ``fast(key)`` used a kernel the first time. A mode costs a Python call on every
# torch function, which slowed threads on Omniglot 5w1s by 11% where no tensor was large enough
# (benchmarks/RESULTS.md, issue 8 session 5), so code that did not use them runs without the mode after.
_USEFUL: dict[Hashable, bool] = {}


_ACTIVE = threading.local()


def active_mode() -> FastKernels | None:
    """This thread's innermost :func:`fast` mode, if it is routing (for :mod:`mamlkit.exec.kernels.fusion`)."""
    return getattr(_ACTIVE, "mode", None)


@contextlib.contextmanager
def fast(key: Hashable = None) -> Iterator[None]:
    """Run the enclosed per-task code with the fast kernels, when enabled and built (else a no-op).
    The mode is per thread: each worker thread enters its own. ``key`` names the code and its input
    shapes; once a run under a key has used no kernel, later runs under it skip the mode."""
    if not available() or _USEFUL.get(key) is False:
        yield
        return
    mode = FastKernels()
    outer, _ACTIVE.mode = getattr(_ACTIVE, "mode", None), mode
    try:
        with mode:
            yield
    finally:
        _ACTIVE.mode = outer
    if key is not None and key not in _USEFUL:
        _USEFUL[key] = mode.hits > 0
