"""One registry of optimizers and settings, shared by the generic tests (in the manner of
torch.optim's OptimizerInfo): what each optimizer can be checked against (its capabilities),
every hyper-parameter path of every optimizer, and every constructor error with the exception
MLX raises (or the one treeopt adds)."""

from collections.abc import Callable
from dataclasses import dataclass, field

import treeopt as optim


@dataclass(frozen=True)
class Capabilities:
    """What the generic tests may expect of an optimizer."""

    #: ``mlx.optimizers`` has it: test_conformance compares numbers with MLX's
    mlx_reference: bool = True
    #: its rule is elementwise (runs in the compiled loop)
    elementwise: bool = True
    #: it keeps optimizer-level running values in its state beside the step
    running_values: bool = False
    #: another published implementation to compare numbers with, from a setting's kwargs
    #: (e.g. an optax transformation), when MLX has none
    reference: Callable | None = None
    reference_name: str = ""


def _schedule_free_adamw(kwargs):
    import optax

    b1, b2 = kwargs.get("betas", (0.9, 0.999))
    return optax.contrib.schedule_free_adamw(
        kwargs["learning_rate"],
        b1=b1,
        b2=b2,
        eps=kwargs.get("eps", 1e-8),
        weight_decay=kwargs.get("weight_decay", 0.0),
        weight_lr_power=kwargs.get("weight_lr_power", 2.0),
    )


def _adan(kwargs):
    import optax

    b1, b2, b3 = kwargs.get("betas", (0.98, 0.92, 0.99))
    return optax.adan(
        kwargs["learning_rate"],
        b1=b1,
        b2=b2,
        b3=b3,
        eps=kwargs.get("eps", 1e-8),
        eps_root=kwargs.get("eps_root", 0.0),
        weight_decay=kwargs.get("weight_decay", 0.0),
    )


CAPABILITIES = {
    "SGD": Capabilities(),
    "RMSprop": Capabilities(),
    "Adagrad": Capabilities(),
    "AdaDelta": Capabilities(),
    "Adam": Capabilities(),
    "AdamW": Capabilities(),
    "Adamax": Capabilities(),
    "Lion": Capabilities(),
    "Adafactor": Capabilities(elementwise=False),
    "Muon": Capabilities(elementwise=False),
    "ScheduleFreeAdamW": Capabilities(
        mlx_reference=False,
        running_values=True,
        reference=_schedule_free_adamw,
        reference_name="optax.contrib.schedule_free_adamw",
    ),
    "Adan": Capabilities(mlx_reference=False, reference=_adan, reference_name="optax.adan"),
}


@dataclass(frozen=True)
class Setting:
    """An optimizer and keyword arguments, with the paths of the rule they exercise."""

    optimizer: str
    kwargs: dict = field(default_factory=dict)
    covers: str = ""
    #: steps to reach a quarter of the starting loss on the test quadratic
    convergence_steps: int = 300

    @property
    def id(self):
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items() if k != "learning_rate")
        return f"{self.optimizer}({args})"

    def make(self, module=optim, **overrides):
        return getattr(module, self.optimizer)(**{**self.kwargs, **overrides})

    @property
    def capabilities(self) -> Capabilities:
        return CAPABILITIES[self.optimizer]


SETTINGS = [
    Setting("SGD", dict(learning_rate=0.1), "plain"),
    Setting("SGD", dict(learning_rate=0.1, momentum=0.9), "momentum"),
    Setting("SGD", dict(learning_rate=0.1, momentum=0.9, dampening=0.2, weight_decay=0.05), "dampening, coupled decay"),
    Setting("SGD", dict(learning_rate=0.1, momentum=0.9, nesterov=True), "nesterov"),
    Setting("SGD", dict(learning_rate=0.1, weight_decay=0.05), "decay without momentum"),
    Setting("RMSprop", dict(learning_rate=0.01), "default"),
    Setting("RMSprop", dict(learning_rate=0.01, alpha=0.5, eps=1e-4), "alpha, eps"),
    Setting("Adagrad", dict(learning_rate=0.1), "default"),
    Setting("Adagrad", dict(learning_rate=0.1, eps=1e-3), "eps"),
    Setting("AdaDelta", dict(learning_rate=1.0), "default"),
    Setting("AdaDelta", dict(learning_rate=0.5, rho=0.5, eps=1e-4), "rho, eps"),
    Setting("Adam", dict(learning_rate=0.01), "no bias correction"),
    Setting("Adam", dict(learning_rate=0.01, bias_correction=True), "bias correction"),
    Setting("Adam", dict(learning_rate=0.01, betas=(0.5, 0.9), eps=1e-3), "betas, eps"),
    Setting("AdamW", dict(learning_rate=0.01), "default decay"),
    Setting("AdamW", dict(learning_rate=0.01, weight_decay=0.1, bias_correction=True), "decay + bias correction"),
    Setting("Adamax", dict(learning_rate=0.01), "default"),
    Setting("Adamax", dict(learning_rate=0.01, betas=(0.8, 0.9), eps=1e-3), "betas, eps"),
    Setting("Lion", dict(learning_rate=0.01), "no decay"),
    Setting("Lion", dict(learning_rate=0.01, betas=(0.8, 0.95), weight_decay=0.1), "decoupled decay"),
    Setting("Adafactor", dict(), "relative step, scaled, factored and not"),
    Setting("Adafactor", dict(warmup_init=True), "warm-up relative step", convergence_steps=3000),
    Setting("Adafactor", dict(learning_rate=0.01, relative_step=False, scale_parameter=False), "fixed lr"),
    Setting(
        "Adafactor",
        dict(
            learning_rate=0.01, relative_step=False, beta_1=0.9, weight_decay=0.1, clip_threshold=0.5, decay_rate=-0.5
        ),
        "first moment, decay, clipping",
    ),
    Setting("Adafactor", dict(beta_1=0.0), "beta_1 = 0 still keeps a first moment"),
    Setting("Muon", dict(learning_rate=0.02), "nesterov, coupled decay"),
    Setting("Muon", dict(learning_rate=0.02, nesterov=False, weight_decay=0.0), "plain momentum"),
    Setting("Muon", dict(learning_rate=0.02, momentum=0.0, ns_steps=3), "no momentum, 3 iterations"),
    Setting("ScheduleFreeAdamW", dict(learning_rate=0.05), "default"),
    Setting(
        "ScheduleFreeAdamW",
        dict(learning_rate=0.05, betas=(0.8, 0.99), eps=1e-4, weight_decay=0.1, weight_lr_power=1.0),
        "betas, eps, decay, weight power",
    ),
    Setting("Adan", dict(learning_rate=0.05), "default"),
    Setting(
        "Adan",
        dict(learning_rate=0.05, betas=(0.9, 0.8, 0.95), eps=1e-4, weight_decay=0.1, eps_root=1e-6),
        "betas, eps, decay, eps_root",
    ),
]

#: scheduled learning rates, run on every optimizer that takes one
SCHEDULES = {
    "exponential_decay": lambda m: m.exponential_decay(0.05, 0.9),
    "step_decay": lambda m: m.step_decay(0.05, 0.5, 2),
    "cosine_decay": lambda m: m.cosine_decay(0.05, 5, 0.001),
    "linear_schedule": lambda m: m.linear_schedule(0.0, 0.05, 3),
    "join_schedules": lambda m: m.join_schedules([m.linear_schedule(0.0, 0.05, 2), m.cosine_decay(0.05, 4)], [2]),
}

#: (optimizer, kwargs, exception type, message regex, does MLX 0.32.4 raise it too? None: MLX
#: has no such optimizer)
ERRORS = [
    ("SGD", dict(learning_rate=0.1, nesterov=True), ValueError, "Nesterov momentum requires", True),
    ("SGD", dict(learning_rate=0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError, "Nesterov", True),
    ("SGD", dict(learning_rate=0.1, momentum=-0.5), ValueError, "SGD momentum should be >=0", False),
    ("SGD", dict(learning_rate=0.1, weight_decay=-1.0), ValueError, "SGD weight_decay should be >=0", False),
    ("RMSprop", dict(learning_rate=0.1, alpha=-0.1), ValueError, "RMSprop alpha should be >=0", True),
    ("RMSprop", dict(learning_rate=0.1, alpha=1.5), ValueError, "RMSprop alpha should be <=1", False),
    ("RMSprop", dict(learning_rate=0.1, eps=0.0), ValueError, ">0", True),
    ("RMSprop", dict(learning_rate=0.1, eps=-1.0), ValueError, ">0", True),
    ("Adagrad", dict(learning_rate=0.1, eps=0.0), ValueError, "Adagrad epsilon should be >0", True),
    ("AdaDelta", dict(learning_rate=0.1, rho=-0.1), ValueError, "AdaDelta rho should be >=0", True),
    ("AdaDelta", dict(learning_rate=0.1, eps=0.0), ValueError, "AdaDelta epsilon should be >0", True),
    ("Adam", dict(learning_rate=0.1, betas=(1.0, 0.999)), ValueError, r"Adam beta1 should be in \[0, 1\)", True),
    ("Adam", dict(learning_rate=0.1, betas=(0.9, -0.1)), ValueError, "Adam beta2", True),
    ("Adam", dict(learning_rate=0.1, eps=-1e-8), ValueError, "Adam epsilon should be >=0", True),
    ("Adam", dict(learning_rate=0.1, betas=(0.9,)), ValueError, "Adam betas should have 2 values", False),
    ("Adam", dict(learning_rate=0.1, betas=(0.9, 0.99, 0.999)), ValueError, "Adam betas should have 2 values", False),
    ("AdamW", dict(learning_rate=0.1, betas=(1.5, 0.999)), ValueError, "AdamW beta1", True),
    ("AdamW", dict(learning_rate=0.1, weight_decay=-0.1), ValueError, "AdamW weight_decay should be >=0", False),
    ("Adamax", dict(learning_rate=0.1, betas=(0.9, 1.0)), ValueError, "Adamax beta2", True),
    ("Lion", dict(learning_rate=0.1, betas=(0.9, 1.2)), ValueError, "Lion beta2", True),
    ("Lion", dict(learning_rate=0.1, weight_decay=-0.1), ValueError, "Lion weight_decay should be >=0", False),
    ("Lion", dict(learning_rate=0.1, betas=(0.9,)), ValueError, "Lion betas should have 2 values", False),
    ("Adafactor", dict(relative_step=False), ValueError, "needs a learning_rate", False),
    ("Adafactor", dict(eps=(1e-30,)), ValueError, "Adafactor eps", False),
    ("Adafactor", dict(clip_threshold=0.0), ValueError, "Adafactor clip_threshold should be >0", False),
    ("Adafactor", dict(decay_rate=0.5), ValueError, "Adafactor decay_rate should be <=0", False),
    ("Adafactor", dict(beta_1=1.0), ValueError, "Adafactor beta_1", False),
    ("Adafactor", dict(weight_decay=-1.0), ValueError, "Adafactor weight_decay", False),
    ("Muon", dict(learning_rate=0.1, momentum=1.0), ValueError, r"Muon momentum should be in \[0, 1\)", False),
    ("Muon", dict(learning_rate=0.1, momentum=-1.0), ValueError, "Muon momentum", False),
    ("Muon", dict(learning_rate=0.1, weight_decay=-0.01), ValueError, "Muon weight_decay should be >=0", False),
    ("Muon", dict(learning_rate=0.1, ns_steps=-1), ValueError, "Muon ns_steps", False),
    ("Muon", dict(learning_rate=0.1, ns_steps=2.5), ValueError, "Muon ns_steps", False),
    # Muon's variants: MLX has no such option (it raises a TypeError)
    ("Muon", dict(learning_rate=0.1, ns_coefficients="polar"), ValueError, "Muon ns_coefficients", True),
    ("Muon", dict(learning_rate=0.1, ns_safety=0.5), ValueError, "Muon ns_safety should be None or", True),
    ("Muon", dict(learning_rate=0.1, normuon="rows"), ValueError, "Muon normuon should be True, False, None", True),
    ("Muon", dict(learning_rate=0.1, normuon_beta2=1.0), ValueError, r"normuon_beta2 should be in \[0, 1\)", True),
    ("Muon", dict(learning_rate=0.1, cautious_weight_decay=True), ValueError, "needs decoupled_weight_decay", True),
    ("Muon", dict(learning_rate=0.1, batch_axes=-1), ValueError, "Muon batch_axes should be an integer", True),
    ("Muon", dict(learning_rate=0.1, num_heads=0), ValueError, "Muon num_heads should be None or an", True),
    ("Muon", dict(learning_rate=0.1, split_sizes=(4,)), ValueError, "Muon split_sizes should be None or two", True),
    ("Muon", dict(learning_rate=0.1, split_sizes=(2, 2), num_heads=2), ValueError, "not both", True),
    ("Muon", dict(learning_rate=0.1, normuon="larger", split_sizes=(2, 2)), ValueError, "normuon='larger'", True),
    ("SGD", dict(learning_rate="fast"), TypeError, "learning_rate must be", True),  # MLX: a ValueError
    (
        "AdamW",
        dict(learning_rate=0.1, state_dtype="int4"),
        ValueError,
        "AdamW state_dtype should be None or one of",
        True,
    ),
    ("Muon", dict(learning_rate=0.1, state_dtype=8), TypeError, "Muon state_dtype should be None, a string", True),
    ("ScheduleFreeAdamW", dict(learning_rate=0.1, betas=(0.0, 0.999)), ValueError, "ScheduleFreeAdamW beta1", None),
    (
        "ScheduleFreeAdamW",
        dict(learning_rate=0.1, weight_lr_power=-1.0),
        ValueError,
        "weight_lr_power should be >=0",
        None,
    ),
    ("ScheduleFreeAdamW", dict(learning_rate=0.1, eps=-1.0), ValueError, "ScheduleFreeAdamW eps should be >=0", None),
    ("Adan", dict(learning_rate=0.1, betas=(0.9, 0.9)), ValueError, "Adan betas should have 3 values", None),
    ("Adan", dict(learning_rate=0.1, betas=(0.9, 0.9, 1.0)), ValueError, "Adan beta3", None),
    ("Adan", dict(learning_rate=0.1, weight_decay=-1.0), ValueError, "Adan weight_decay should be >=0", None),
]

OPTIMIZERS = sorted({s.optimizer for s in SETTINGS})
