"""The one accumulation rule: fp64 inputs accumulate in fp64, every other float dtype in fp32.

Part of the op's contract (DESIGN.md section 7), so it sits in the floor: plan builders, the op and
every executor read it from here."""
import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Example:
        >>> accumulation_dtype(torch.bfloat16), accumulation_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float64 if dtype == torch.float64 else torch.float32
