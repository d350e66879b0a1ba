"""Which torch device a training or MD run uses: 'cpu', 'cuda', 'cuda:N' or 'auto' (a GPU when there is one)."""
import torch

DEVICE_CHOICES_HELP = "cpu, cuda, cuda:N or auto (cuda when available)"


def resolve_device(name):
    """torch.device for `name`; a clear error for a malformed name or a GPU this machine does not have."""
    name = str(name or "cpu").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}; expected {DEVICE_CHOICES_HELP}") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; expected {DEVICE_CHOICES_HELP}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested, but torch {torch.__version__} sees no CUDA GPU here "
                             "(use 'cpu' or 'auto')")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested, but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def to_device(data, device):
    """A graph dictionary with every tensor on `device` (other values unchanged)."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in data.items()}
