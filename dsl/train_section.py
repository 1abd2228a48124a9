"""The `train { }` section: each option checked against TRAIN_OPTIONS, then
gathered into a TrainConfig."""
from __future__ import annotations

from dataclasses import replace

from dsl.ast import Chain, Layer, TrainSection
from dsl.errors import Collector, did_you_mean
from dsl.schema import TRAIN_OPTIONS, bind
from dsl.train_config import AugmentConfig, DetectionConfig, OptimizerConfig, ScheduleConfig, TrainConfig
from dsl.values import evaluate

# Default learning rate and weight decay per optimizer when the spec names none.
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 0.0, "adam": 0.0, "adamw": 1e-2}


def _options(section: TrainSection, errors: Collector) -> list[Layer]:
    options = []
    for stmt in section.options:
        if not isinstance(stmt, Chain) or stmt.bind or len(stmt.layers) != 1:
            errors.error("a train option is one line `option value key=value`", stmt.pos, "no '->', '=' bindings or blocks here")
            continue
        options.append(stmt.layers[0])
    return options


def build_train_config(section: TrainSection | None, errors: Collector) -> TrainConfig:
    """Validate a train section; report problems to `errors`, return the config."""
    config = TrainConfig()
    if section is None:
        return config
    seen: dict[str, Layer] = {}
    for opt in _options(section, errors):
        sig = TRAIN_OPTIONS.get(opt.name)
        if sig is None:
            errors.error(
                f"unknown train option '{opt.name}'",
                opt.pos,
                did_you_mean(opt.name, TRAIN_OPTIONS) or f"options: {', '.join(TRAIN_OPTIONS)}",
            )
            continue
        if opt.name in seen:
            errors.error(f"train option '{opt.name}' given twice (first on line {seen[opt.name].pos.line})", opt.pos)
            continue
        seen[opt.name] = opt
        v = bind(sig, opt, lambda e: evaluate(e, {}), errors, kind="train option")
        if v is None:
            continue
        if opt.name == "optimizer":
            name = v["name"]
            if name != "sgd" and (opt.kwarg("momentum") or opt.kwarg("nesterov")):
                bad = opt.kwarg("momentum") or opt.kwarg("nesterov")
                errors.error(f"'{bad.name}' is an sgd option, not {name}'s", bad.pos, "adam and adamw take beta1= beta2= eps=")
            if v["nesterov"] and v["momentum"] == 0.0:
                errors.error("nesterov=true needs momentum > 0", opt.kwarg("nesterov").pos)
            config = replace(
                config,
                optimizer=OptimizerConfig(
                    name=name,
                    lr=v["lr"] if v["lr"] is not None else DEFAULT_LR[name],
                    momentum=v["momentum"],
                    nesterov=v["nesterov"],
                    weight_decay=v["weight_decay"] if v["weight_decay"] is not None else DEFAULT_WEIGHT_DECAY[name],
                    beta1=v["beta1"],
                    beta2=v["beta2"],
                    eps=v["eps"],
                ),
            )
        elif opt.name == "schedule":
            config = replace(config, schedule=ScheduleConfig(**v))
        elif opt.name == "loss":
            config = _loss(config, opt, v, errors)
        elif opt.name == "augment":
            config = replace(config, augment=AugmentConfig(**v))
        elif opt.name == "freeze":
            config = replace(config, freeze=tuple(v["tap"]))
        else:
            (value,) = v.values()
            field_name = {"sync_bn": "sync_bn"}.get(opt.name, opt.name)
            config = replace(config, **{field_name: value})
    return config


_CENTERNET_ONLY = ("size_weight", "offset_weight", "alpha", "beta")


def _loss(config: TrainConfig, opt: Layer, v: dict, errors: Collector) -> TrainConfig:
    """`loss cross_entropy [label_smoothing=]` or `loss centernet [size_weight= offset_weight= alpha= beta=]`."""
    name = v["name"]
    if name == "centernet":
        bad = opt.kwarg("label_smoothing")
        if bad is not None:
            errors.error("label_smoothing is a cross_entropy option, not centernet's", bad.pos,
                         "centernet takes size_weight= offset_weight= alpha= beta=")
        det = DetectionConfig(size_weight=v["size_weight"], offset_weight=v["offset_weight"],
                              alpha=v["alpha"], beta=v["beta"])
        return replace(config, loss=name, label_smoothing=0.0, detection=det)
    for key in _CENTERNET_ONLY:
        bad = opt.kwarg(key)
        if bad is not None:
            errors.error(f"'{key}' is a centernet option, not {name}'s", bad.pos,
                         "cross_entropy takes label_smoothing=")
    return replace(config, loss=name, label_smoothing=v["label_smoothing"], detection=None)
