"""divco: Divide and Co-training, run as one branch-batched network.

    import divco
    model = divco.models.create("wide_resnet16_8", num_classes=100, branches=4)
    logits = model(images)                   # [N, 4, 100]
    print(divco.summary(model, (3, 32, 32)))
"""

__version__ = "0.1.0"

from . import models, nn, ops  # noqa: E402
from .stacking import branch_state_dict, stack, unstack  # noqa: E402
from .summary import ModelSummary, summary  # noqa: E402

__all__ = ["models", "nn", "ops", "stack", "unstack", "branch_state_dict", "summary", "ModelSummary", "__version__"]
