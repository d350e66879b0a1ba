"""A label oracle for LOOP-LOGIC TESTS ONLY: the analytic toy potential (tests/toy_potential.py) stands in for DFT.

It answers the same question as the DFT labelling (`polmodel.dft.field_response`, FieldResponseWorkChain) with the
same tiers and the same frame format (docs/design.md "Label tiers"), so the whole active-learning loop — label,
train, explore, select, label — can run in the test suite and in `benchmarks/al_efficiency.py` in minutes.
Nothing here is physics of a real material, and no production path uses it: production loops label with pw.x.

- `toy_label_frames` (tests/toy_labelling.py, no AiiDA): the frames of one structure at one tier;
- `ToyOracleWorkChain`: the same behind the labelling workchain's interface (`structure`, `tier`,
  `field_vectors` in; `frames` out; `get_builder_from_protocol(code, structure, ...)`), one calcfunction inside,
  so every toy frame has provenance like a DFT label;
- `ToyOracleActiveLearningWorkChain`: the active-learning loop with this oracle as its labelling workchain;
- `toy_loop_inputs`: that loop's inputs on the toy crystal, with a tiny ensemble.
"""
import numpy as np
from aiida import orm
from aiida.engine import WorkChain, calcfunction

from polmodel.active_learning.selection import FULL
from polmodel.plugins.data import FramesData
from polmodel.workflows.active_learning import ActiveLearningWorkChain
from toy_labelling import TIERS, toy_label_frames, toy_structure


@calcfunction
def toy_oracle_frames(structure, tier, field_vectors):
    """The toy labels of `structure` at `tier` as one FramesData (the stand-in of the DFT labelling's frames)."""
    frames = toy_label_frames(structure.get_ase(), tier.value, [np.asarray(v) for v in field_vectors.get_list()],
                              source=structure.uuid)
    return FramesData.from_atoms(frames)


class ToyOracleWorkChain(WorkChain):
    """The toy oracle behind the labelling workchain's interface. FOR LOOP-LOGIC TESTS ONLY (not DFT)."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input("structure", valid_type=orm.StructureData)
        spec.input("tier", valid_type=orm.Str, default=lambda: orm.Str(FULL))
        spec.input("field_vectors", valid_type=orm.List, default=lambda: orm.List([]))
        spec.outline(cls.label)
        spec.output("frames", valid_type=FramesData)

    @classmethod
    def get_builder_from_protocol(cls, code, structure, protocol=None, tier=FULL, field_vectors=None, **_):
        """Same signature as the DFT labelling's builder; the code, protocol and overrides are not used by the toy."""
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}; known: {', '.join(TIERS)}")
        builder = cls.get_builder()
        builder.structure = structure
        builder.tier = orm.Str(tier)
        builder.field_vectors = orm.List([[float(x) for x in vector] for vector in (field_vectors or [])])
        return builder

    def label(self):
        self.out("frames", toy_oracle_frames(self.inputs.structure, self.inputs.tier, self.inputs.field_vectors))


class ToyOracleActiveLearningWorkChain(ActiveLearningWorkChain):
    """The active-learning loop labelling with the toy oracle. FOR LOOP-LOGIC TESTS ONLY (not DFT)."""

    def label_workchain(self):
        return ToyOracleWorkChain


def toy_loop_inputs(pw_code, polmodel_code, *, schedule, initial_count, label_budget, max_full_labels, epochs,
                    selection, field=(0.0, 0.0, 0.0), learning_rate=None, stage_threshold=0.0, field_margin=None,
                    candidate_fraction_threshold=0.0, max_iterations=1):
    """Inputs of `ToyOracleActiveLearningWorkChain` on the toy crystal. Fixed: an ensemble of 2 bootstrap members of
    the tiny model trained without a validation split (with a handful of structures a split holds one, and when
    that is the ideal crystal, with zero forces by symmetry, early stopping keeps a near-untrained model whose
    members agree everywhere); Langevin MD at a static `field` with the first stage's temperatures and steps."""
    from fixtures_al import TINY_HYPERPARAMETERS   # here, so that benchmarks/al_efficiency.py need not import it

    architecture = {**TINY_HYPERPARAMETERS, "cutoff": 4.5, "batch_size": 2}
    if learning_rate is not None:
        architecture["learning_rate"] = learning_rate
    inputs = {
        "structures": {"nacl": orm.StructureData(ase=toy_structure())},
        "initial_data": {"count": orm.Int(initial_count), "max_strain": orm.Float(0.03),
                         "max_displacement": orm.Float(0.1), "seed": orm.Int(0)},
        "label": {"code": pw_code, "protocol": orm.Str("fast")},
        "label_budget": orm.Int(label_budget),
        "full_label_cost": orm.Int(10),
        "max_full_labels": orm.Int(max_full_labels),
        "train": {"train": {"code": polmodel_code, "parameters": orm.Dict({
                      "epochs": epochs, "bootstrap": True, "validation_fraction": 0.0,
                      "hyperparameters": architecture})},
                  "ensemble_size": orm.Int(2)},
        "explore": {"md": {"code": polmodel_code},
                    "parameters": orm.Dict({"steps": schedule[0]["steps"], "timestep": 1.0, "thermostat": "langevin",
                                            "interval": 5, "seed": 1}),
                    "fields": orm.List([{"kind": "static", "vector": [float(x) for x in field]}]),
                    "temperatures": orm.List(list(schedule[0]["temperatures"])),
                    "selection": orm.Dict(selection)},
        "schedule": orm.List(schedule),
        "stage_threshold": orm.Float(stage_threshold),
        "candidate_fraction_threshold": orm.Float(candidate_fraction_threshold),
        "max_iterations": orm.Int(max_iterations),
    }
    if field_margin is not None:
        inputs["field_margin"] = orm.Float(field_margin)
    return inputs
