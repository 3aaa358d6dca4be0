// Shared between the CPU kernels, the CUDA kernels and their glue: torch-free on purpose.
#pragma once

namespace megaglot {

// Which elements of a score row take part in the softmax.
enum SoftmaxMode : int {
  kNone = 0,    // all of them
  kCausal = 1,  // row i of a square [sq, sq] block: columns 0..i
  kMasked = 2,  // those whose bool mask entry is false
};

}  // namespace megaglot
