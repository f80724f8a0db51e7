/* The kernels for one element type: included by kernels.c with T (float or double), I (int32_t or int64_t)
   and FN (the name with the type's suffix) defined. */

/* Where each output's window starts in its plane: one table for all planes, so that the window loops run
   over a whole plane's outputs (OH * OW of them, not rows of OW = 14 that are too short for a vector),
   vectorised with gathers and branch-free (data-dependent branches mispredict on real activations). */
static I* FN(window_starts)(int64_t W, int64_t sH, int64_t sW, int64_t OH, int64_t OW) {
  I* start = (I*)malloc(sizeof(I) * OH * OW);
  if (start)
    for (int64_t q = 0; q < OH * OW; q++) start[q] = (I)((q / OW) * sH * W + (q % OW) * sW);
  return start;
}

void FN(maxpool2d)(const T* x, T* y, int64_t* idx, int64_t planes, int64_t H, int64_t W,
                   int64_t kH, int64_t kW, int64_t sH, int64_t sW, int64_t OH, int64_t OW, int nthreads) {
  const int64_t OHW = OH * OW;
  I* start = (kH == 2 && kW == 2) ? FN(window_starts)(W, sH, sW, OH, OW) : 0;
  const I w0 = (I)W, w1 = (I)W + 1;
  #pragma omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1)
  for (int64_t p = 0; p < planes; p++) {
    const T* xp = x + p * H * W;
    T* yp = y + p * OHW;
    int64_t* ip = idx + p * OHW;
    if (start) {
      /* the common 2x2 window; the same rule as below */
      #pragma omp simd
      for (int64_t q = 0; q < OHW; q++) {
        const I b = start[q];
        T m = xp[b], v;
        I k = 0, t;
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
        T m = xp[best];
        for (int64_t h = h0; h < h0 + kH; h++)
          for (int64_t w = w0; w < w0 + kW; w++) {
            T v = xp[h * W + w];
            if (v > m || v != v) { m = v; best = h * W + w; }
          }
        yp[oh * OW + ow] = m;
        ip[oh * OW + ow] = best;
      }
    }
  }
  free(start);
}

void FN(batchnorm)(const T* x, T* y, const T* weight, const T* bias, T* save_mean, T* save_invstd,
                   T* running_mean, T* running_var, int64_t N, int64_t C, int64_t HW, double eps,
                   double momentum, int nthreads) {
  const double count = (double)N * (double)HW;
  #pragma omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1)
  for (int64_t c = 0; c < C; c++) {
    /* one pass, shifted by the channel's first value so that var = E[d^2] - E[d]^2 does not cancel */
    const double shift = (double)x[c * HW];
    double sum = 0.0, sq = 0.0;
    for (int64_t n = 0; n < N; n++) {
      const T* r = x + (n * C + c) * HW;
      #pragma omp simd reduction(+:sum, sq)
      for (int64_t i = 0; i < HW; i++) { double d = (double)r[i] - shift; sum += d; sq += d * d; }
    }
    const double dmean = sum / count, mean = shift + dmean;
    const double var = sq / count - dmean * dmean > 0.0 ? sq / count - dmean * dmean : 0.0;
    const T invstd = (T)(1.0 / sqrt(var + eps));
    /* as torch: y = x * alpha + beta with alpha = invstd * weight, beta = bias - mean * alpha */
    const T alpha = weight ? invstd * weight[c] : invstd;
    const T beta = (bias ? bias[c] : (T)0) - (T)mean * alpha;
    for (int64_t n = 0; n < N && y; n++) {  /* y == NULL: statistics only (mamlkit.exec.kernels.fusion) */
      const T* r = x + (n * C + c) * HW;
      T* o = y + (n * C + c) * HW;
      #pragma omp simd
      for (int64_t i = 0; i < HW; i++) o[i] = r[i] * alpha + beta;
    }
    save_mean[c] = (T)mean;
    save_invstd[c] = invstd;
    if (running_mean) running_mean[c] = (T)((1.0 - momentum) * running_mean[c] + momentum * mean);
    if (running_var) running_var[c] = (T)((1.0 - momentum) * running_var[c] + momentum * var * count / (count - 1.0));
  }
}
void FN(batchnorm_backward)(const T* gy, const T* x, const T* weight, const T* mean, const T* invstd,
                            T* gx, T* gw, T* gb, int64_t N, int64_t C, int64_t HW, int nthreads) {
  const double count = (double)N * (double)HW;
  #pragma omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1)
  for (int64_t c = 0; c < C; c++) {
    const double m = (double)mean[c];
    double sum = 0.0, dot = 0.0;
    for (int64_t n = 0; n < N; n++) {
      const T* g = gy + (n * C + c) * HW;
      const T* r = x + (n * C + c) * HW;
      #pragma omp simd reduction(+:sum, dot)
      for (int64_t i = 0; i < HW; i++) { sum += (double)g[i]; dot += (double)g[i] * ((double)r[i] - m); }
    }
    const double s = (double)invstd[c];
    gb[c] = (T)sum;
    gw[c] = (T)(dot * s);
    if (!gx) continue;
    /* as torch: gx = (gy - mean(gy) - (x - mean) * dot * invstd^2 / count) * invstd * weight */
    const T w = weight ? weight[c] : (T)1;
    const T gmean = (T)(sum / count), proj = (T)(dot * s * s / count), mu = mean[c], scale = (T)s * w;
    for (int64_t n = 0; n < N; n++) {
      const T* g = gy + (n * C + c) * HW;
      const T* r = x + (n * C + c) * HW;
      T* o = gx + (n * C + c) * HW;
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
static void FN(pool_plane)(const T* yp, const I* start, T alpha, T beta, T* op, uint8_t* fp, int64_t OHW,
                           int64_t Wp, int64_t kH, int64_t kW) {
  /* one plane of max_pool2d(relu(y * alpha + beta)), its rows Wp apart, windows starting at start[q] */
  if (kH == 2 && kW == 2) {
    const I w0 = (I)Wp, w1 = (I)Wp + 1;
    #pragma omp simd
    for (int64_t q = 0; q < OHW; q++) {
      const I b = start[q];
      T m = yp[b] * alpha + beta, v;
      I k = 0, t;
      v = yp[b + 1] * alpha + beta;  t = (v > m) | (v != v); m = t ? v : m; k = t ? 1 : k;
      v = yp[b + w0] * alpha + beta; t = (v > m) | (v != v); m = t ? v : m; k = t ? 2 : k;
      v = yp[b + w1] * alpha + beta; t = (v > m) | (v != v); m = t ? v : m; k = t ? 3 : k;
      op[q] = m < 0 ? (T)0 : m;
      fp[q] = (uint8_t)k;
    }
    return;
  }
  for (int64_t q = 0; q < OHW; q++) {
    const T* x0 = yp + start[q];
    T m = x0[0] * alpha + beta;
    int64_t k = 0;
    for (int64_t i = 0; i < kH; i++)
      for (int64_t j = 0; j < kW; j++) {
        T v = x0[i * Wp + j] * alpha + beta;
        if (v > m || v != v) { m = v; k = i * kW + j; }
      }
    op[q] = m < 0 ? (T)0 : m;
    fp[q] = (uint8_t)k;
  }
}
int FN(bnrelupool)(const T* y, const T* weight, const T* bias, const T* mean, const T* invstd,
                    T* out, uint8_t* off, int64_t planes, int64_t C, int64_t H, int64_t W, int64_t kH,
                    int64_t kW, int64_t sH, int64_t sW, int64_t OH, int64_t OW, int nthreads) {
  const int64_t OHW = OH * OW;
  I* start = FN(window_starts)(W, sH, sW, OH, OW);
  if (!start) return 1;  /* out of memory */
  #pragma omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1)
  for (int64_t p = 0; p < planes; p++) {
    const int64_t c = p % C;
    const T alpha = weight ? invstd[c] * weight[c] : invstd[c];
    const T beta = (bias ? bias[c] : (T)0) - mean[c] * alpha;
    FN(pool_plane)(y + p * H * W, start, alpha, beta, out + p * OHW, off + p * OHW, OHW, W, kH, kW);
  }
  free(start);
  return 0;
}
/* The backward's per-plane pieces, shared by both fused blocks. The gradient reaches each window's
   maximum where the pooled output is positive (relu's result > 0). */
static void FN(window_steps)(I* step, int64_t kH, int64_t kW, int64_t rowstride) {
  /* window-local index -> offset from the window's start, so that no division runs per element */
  for (int64_t k = 0; k < kH * kW; k++) step[k] = (I)((k / kW) * rowstride + k % kW);
}
static void FN(window_sums)(const T* g, const T* o, const uint8_t* f, const T* yp, const I* start,
                            const I* step, int64_t OHW, double m, double* sum, double* dot) {
  /* batch norm's two backward sums over one plane: sum of dz and of dz * (y - mean) */
  double s = 0.0, d = 0.0;
  #pragma omp simd reduction(+:s, d)
  for (int64_t q = 0; q < OHW; q++) {
    const T gq = o[q] > 0 ? g[q] : (T)0;
    s += (double)gq;
    d += (double)gq * ((double)yp[start[q] + step[f[q]]] - m);
  }
  *sum += s;
  *dot += d;
}
static void FN(window_grads)(T* gz, int64_t len, const T* g, const T* o, const uint8_t* f, const I* start,
                             const I* step, int64_t OHW) {
  /* one plane of relu's input gradient dz: zero, plus each window's gradient at its maximum (summed
     where windows overlap) */
  memset(gz, 0, sizeof(T) * len);
  for (int64_t q = 0; q < OHW; q++) gz[start[q] + step[f[q]]] += o[q] > 0 ? g[q] : (T)0;
}
/* Its first-order backward: the window pieces above, then batch norm's backward as batchnorm_backward_. */
int FN(bnrelupool_backward)(const T* go, const T* y, const T* out, const uint8_t* off, const T* weight,
                             const T* mean, const T* invstd, T* gy, T* gw, T* gb, int64_t N, int64_t C,
                             int64_t H, int64_t W, int64_t kH, int64_t kW, int64_t sH, int64_t sW, int64_t OH,
                             int64_t OW, int nthreads) {
  const int64_t HW = H * W, OHW = OH * OW;
  const double count = (double)N * (double)HW;
  I step[256];
  FN(window_steps)(step, kH, kW, W);
  I* start = FN(window_starts)(W, sH, sW, OH, OW);
  int failed = !start;
  #pragma omp parallel num_threads(nthreads) if(nthreads > 1 && !failed)
  {
    T* gz = gy && !failed ? (T*)malloc(sizeof(T) * HW) : 0;  /* one plane of relu's input gradient */
    if (gy && !gz) failed = 1;
    #pragma omp for schedule(static)
    for (int64_t c = 0; c < C; c++) {
      if (!start || (gy && !gz)) continue;
      const T m = mean[c];
      double sum = 0.0, dot = 0.0;
      for (int64_t n = 0; n < N; n++) {
        const int64_t p = n * C + c;
        FN(window_sums)(go + p * OHW, out + p * OHW, off + p * OHW, y + p * HW, start, step, OHW, m, &sum, &dot);
      }
      const double s = (double)invstd[c];
      gb[c] = (T)sum;
      gw[c] = (T)(dot * s);
      if (!gy) continue;
      const T w = weight ? weight[c] : (T)1;
      const T gmean = (T)(sum / count), proj = (T)(dot * s * s / count), mu = m, scale = (T)s * w;
      for (int64_t n = 0; n < N; n++) {
        const int64_t p = n * C + c;
        const T* yp = y + p * HW;
        T* gp = gy + p * HW;
        FN(window_grads)(gz, HW, go + p * OHW, out + p * OHW, off + p * OHW, start, step, OHW);
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
static T* FN(pad_images)(const T* x, int64_t N, int64_t H, int64_t W, int64_t pH, int64_t pW, int64_t slack) {
  const int64_t Hp = H + 2 * pH, Wp = W + 2 * pW;
  T* xp = (T*)calloc(N * Hp * Wp + slack, sizeof(T));
  if (xp)
    for (int64_t n = 0; n < N; n++)
      for (int64_t h = 0; h < H; h++)
        memcpy(xp + n * Hp * Wp + (h + pH) * Wp + pW, x + (n * H + h) * W, sizeof(T) * W);
  return xp;
}
static void FN(conv_plane)(const T* xp, const T* k, T b, T* y, int64_t len, int64_t Wp, int64_t kH, int64_t kW) {
  if (kH == 3 && kW == 3) {  /* Conv4's 3x3: the nine taps in registers, one pass */
    const T k0 = k[0], k1 = k[1], k2 = k[2], k3 = k[3], k4 = k[4], k5 = k[5], k6 = k[6], k7 = k[7], k8 = k[8];
    const T *r0 = xp, *r1 = xp + Wp, *r2 = xp + 2 * Wp;
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
      const T kv = k[a * kW + c];
      const T* src = xp + a * Wp + c;
      #pragma omp simd
      for (int64_t i = 0; i < len; i++) y[i] += kv * src[i];
    }
}
int FN(convbnrelupool)(const T* x, const T* cw, const T* cb, const T* weight, const T* bias,
                       T* save_mean, T* save_invstd, T* running_mean, T* running_var, T* out, uint8_t* off,
                       int64_t N, int64_t C, int64_t H, int64_t W, int64_t kH, int64_t kW, int64_t pH, int64_t pW,
                       int64_t pkH, int64_t pkW, int64_t psH, int64_t psW, int64_t OH, int64_t OW, double eps,
                       double momentum, int nthreads) {
  const int64_t Hp = H + 2 * pH, Wp = W + 2 * pW, H1 = Hp - kH + 1, W1 = Wp - kW + 1, len = H1 * Wp, OHW = OH * OW;
  const double count = (double)N * (double)(H1 * W1);
  T* xp = FN(pad_images)(x, N, H, W, pH, pW, Wp + kW);
  I* start = FN(window_starts)(Wp, psH, psW, OH, OW);
  int failed = !xp || !start;
  #pragma omp parallel num_threads(nthreads) if(nthreads > 1 && !failed)
  {
    T* y = failed ? 0 : (T*)malloc(sizeof(T) * len);
    if (!y) failed = 1;
    #pragma omp for schedule(static)
    for (int64_t c = 0; c < C; c++) {
      if (!y) continue;
      const T* k = cw + c * kH * kW;
      const T b = cb ? cb[c] : (T)0;
      double shift = 0.0, sum = 0.0, sq = 0.0;
      for (int64_t n = 0; n < N; n++) {
        FN(conv_plane)(xp + n * Hp * Wp, k, b, y, len, Wp, kH, kW);
        if (n == 0) shift = (double)y[0];  /* as batchnorm_: shifted sums */
        for (int64_t h = 0; h < H1; h++) {
          const T* r = y + h * Wp;
          #pragma omp simd reduction(+:sum, sq)
          for (int64_t i = 0; i < W1; i++) { double d = (double)r[i] - shift; sum += d; sq += d * d; }
        }
      }
      const double dmean = sum / count, mean = shift + dmean;
      const double var = sq / count - dmean * dmean > 0.0 ? sq / count - dmean * dmean : 0.0;
      const T invstd = (T)(1.0 / sqrt(var + eps));
      save_mean[c] = (T)mean;
      save_invstd[c] = invstd;
      if (running_mean) running_mean[c] = (T)((1.0 - momentum) * running_mean[c] + momentum * mean);
      if (running_var)
        running_var[c] = (T)((1.0 - momentum) * running_var[c] + momentum * var * count / (count - 1.0));
      const T alpha = weight ? invstd * weight[c] : invstd;
      const T beta = (bias ? bias[c] : (T)0) - (T)mean * alpha;
      for (int64_t n = 0; n < N; n++) {
        FN(conv_plane)(xp + n * Hp * Wp, k, b, y, len, Wp, kH, kW);
        FN(pool_plane)(y, start, alpha, beta, out + (n * C + c) * OHW, off + (n * C + c) * OHW, OHW, Wp,
                          pkH, pkW);
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
int FN(convbnrelupool_backward)(const T* go, const T* x, const T* cw, const T* cb, const T* out,
                                const uint8_t* off, const T* weight, const T* mean, const T* invstd, T* gcw,
                                T* gcb, T* gw, T* gb, int64_t N, int64_t C, int64_t H, int64_t W, int64_t kH,
                                int64_t kW, int64_t pH, int64_t pW, int64_t pkH, int64_t pkW, int64_t psH,
                                int64_t psW, int64_t OH, int64_t OW, int nthreads) {
  const int64_t Hp = H + 2 * pH, Wp = W + 2 * pW, H1 = Hp - kH + 1, W1 = Wp - kW + 1, len = H1 * Wp, OHW = OH * OW;
  const double count = (double)N * (double)(H1 * W1);
  T* xp = FN(pad_images)(x, N, H, W, pH, pW, Wp + kW);
  I* start = FN(window_starts)(Wp, psH, psW, OH, OW);
  I step[256];
  FN(window_steps)(step, pkH, pkW, Wp);
  int failed = !xp || !start;
  #pragma omp parallel num_threads(nthreads) if(nthreads > 1 && !failed)
  {
    T* y = failed ? 0 : (T*)malloc(sizeof(T) * 2 * len);
    if (!y) failed = 1;
    T* gz = y + len;
    double acc[65];  /* the channel's kH * kW weight gradients and its bias gradient, summed over planes */
    #pragma omp for schedule(static)
    for (int64_t c = 0; c < C; c++) {
      if (!y) continue;
      const T* k = cw + c * kH * kW;
      const T b = cb ? cb[c] : (T)0;
      const T m = mean[c];
      double sum = 0.0, dot = 0.0;
      for (int64_t n = 0; n < N; n++) {
        const int64_t p = n * C + c;
        FN(conv_plane)(xp + n * Hp * Wp, k, b, y, len, Wp, kH, kW);
        FN(window_sums)(go + p * OHW, out + p * OHW, off + p * OHW, y, start, step, OHW, m, &sum, &dot);
      }
      const double s = (double)invstd[c];
      gb[c] = (T)sum;
      gw[c] = (T)(dot * s);
      const T w = weight ? weight[c] : (T)1;
      const T gmean = (T)(sum / count), proj = (T)(dot * s * s / count), mu = m, scale = (T)s * w;
      for (int64_t t = 0; t <= kH * kW; t++) acc[t] = 0.0;
      for (int64_t n = 0; n < N; n++) {
        const int64_t p = n * C + c;
        const T* xn = xp + n * Hp * Wp;
        FN(conv_plane)(xn, k, b, y, len, Wp, kH, kW);
        FN(window_grads)(gz, len, go + p * OHW, out + p * OHW, off + p * OHW, start, step, OHW);
        for (int64_t h = 0; h < H1; h++) {  /* gz becomes the conv output's gradient (0 off the image) */
          T* r = gz + h * Wp;
          const T* yr = y + h * Wp;
          #pragma omp simd
          for (int64_t i = 0; i < W1; i++) r[i] = (r[i] - gmean - (yr[i] - mu) * proj) * scale;
          for (int64_t i = W1; i < Wp; i++) r[i] = 0;
        }
        T bsum = 0;
        if (kH == 3 && kW == 3) {  /* the nine weight gradients and the bias's in one pass */
          const T *r0 = xn, *r1 = xn + Wp, *r2 = xn + 2 * Wp;
          T d0 = 0, d1 = 0, d2 = 0, d3 = 0, d4 = 0, d5 = 0, d6 = 0, d7 = 0, d8 = 0;
          #pragma omp simd reduction(+:bsum, d0, d1, d2, d3, d4, d5, d6, d7, d8)
          for (int64_t i = 0; i < len; i++) {
            const T v = gz[i];
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
            const T* src = xn + a * Wp + cc;
            T d = 0;
            #pragma omp simd reduction(+:d)
            for (int64_t i = 0; i < len; i++) d += gz[i] * src[i];
            acc[a * kW + cc] += (double)d;
          }
      }
      for (int64_t t = 0; t < kH * kW; t++) gcw[c * kH * kW + t] = (T)acc[t];
      if (gcb) gcb[c] = (T)acc[kH * kW];
    }
    free(y);
  }
  free(xp);
  free(start);
  return failed;
}
