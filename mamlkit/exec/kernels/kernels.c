/* mamlkit's CPU kernels: max-pooling, training-mode batch norm and the fused [conv ->] batch norm -> relu ->
   max-pool block, on contiguous NCHW tensors, in float32 (functions ending _f32) and float64 (_f64).

   mamlkit/exec/kernels/__init__.py compiles this file with the system C compiler the first time the kernels
   are used, loads it with ctypes and documents what each function computes and why. The tests build it
   with -Wall -Wextra -Werror. kernels_typed.h holds the functions once, written (as a template would be)
   for the element type T and the window-offset type I; it is included here once per floating type. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SFX) /* FN(maxpool2d) is maxpool2d_f32 or maxpool2d_f64 */

/* I, the window-offset type, is as wide as T so that one vector holds both (gathers need that) */
#define T float
#define I int32_t
#define SFX f32
#include "kernels_typed.h"
#undef T
#undef I
#undef SFX

#define T double
#define I int64_t
#define SFX f64
#include "kernels_typed.h"
#undef T
#undef I
#undef SFX
