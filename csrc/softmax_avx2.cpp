// The CPU softmax rows built for x86-64-v3 (AVX2 + FMA + F16C, 8-float vectors): see softmax_x86.h.
#define MG_X86_LEVEL 3
#include "softmax_x86.h"
