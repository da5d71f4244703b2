// The torch.library namespace of this build of danon's CPU extension: danon_cpu, or danon_cpu_profile for the
// profiling build (-DDANON_PROFILE, danon/kernels/native_cpu.py), so that both can be loaded in one process.
#pragma once
#ifdef DANON_PROFILE
#define DANON_LIBRARY danon_cpu_profile
#else
#define DANON_LIBRARY danon_cpu
#endif
