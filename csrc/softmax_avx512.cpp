// The CPU softmax rows built for x86-64-v4 (AVX-512, 16-float vectors): see softmax_x86.h.
#define MG_X86_LEVEL 4
#include "softmax_x86.h"
