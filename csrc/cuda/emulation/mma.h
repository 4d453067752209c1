// Emulated mma.h: deliberately empty. Tensor-core (wmma/mma) code is not emulated; such code sits
// under #if __CUDA_ARCH__ >= 800 (never defined here) beside a SIMT twin with the same tiling and
// edge handling, which an emulation build runs instead (see csrc/cuda/gemm.cu).
#pragma once
#include "emu_core.h"
