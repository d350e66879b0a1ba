"""`polmodel.explore`: MD with a model ensemble over fields x temperatures, then select frames worth a DFT label.

Every (structure, field protocol, temperature) triple is one `MdCalculation`, all submitted at once. The selection
(docs/design.md "Uncertainty and selection") runs in the calcfunction `select_from_trajectories`,
so the candidate set links back to the trajectories it was chosen from.
"""
from aiida import orm
from aiida.engine import ToContext, WorkChain, calcfunction
from aiida.plugins import CalculationFactory

from polmodel.plugins.data import FramesData, ModelData

MdCalculation = CalculationFactory("polmodel.md")


@calcfunction
def select_from_trajectories(criteria, temperatures=None, **trajectories):
    """Candidates (a FramesData of unlabelled structures) and statistics from ensemble-MD trajectories.

    Each candidate's `info['origin']` is "<trajectory UUID>:<frame index>", `info['efield']` the field (V/Å) it was
    sampled at (its label follows that field), and `info['response_spread']` its Born-charge spread (e) where the
    MD recorded one, else the norm of its polarization spread (e/Å²), which decides who gets the full response
    label (`polmodel.active_learning.selection.assign_label_tiers`); where the Z* and α thresholds follow the
    model's errors (`response_threshold_factor`), also `info['response_spread_ratio']`, its largest Z* or α spread
    over its threshold (`response_spread_ratio`), which then decides instead: a full label only where the members
    disagree on the response beyond its level, the rule benchmarks/al_pool.py measured. Fixed thresholds keep the
    ranking by Z* spread. `temperatures` (a Dict: trajectory key ->
    the MD run's temperature in K) gives each candidate `info['sampled_temperature_K']`, which its labels carry into
    the dataset and a model trained on them into its domain (polmodel/data/domain.py). A trajectory's frame at
    step 0 is its starting structure, which the loop has labelled already (the demo once spent a DFT label on it):
    it is neither classified nor counted.
    """
    from polmodel.active_learning.selection import (SelectionCriteria, full_response_spread, response_spread_ratio,
                                                    select_candidates)
    from polmodel.data.domain import SAMPLED_TEMPERATURE_KEY
    from polmodel.plugins.parsers import trajectory_frames

    import numpy as np

    rules = SelectionCriteria.from_dict(criteria.get_dict())
    run_temperatures = temperatures.get_dict() if temperatures is not None else {}
    frames, force_std, polarization_std, born_std, alpha_std, origins, efields, sampled_at = ([] for _ in range(8))
    for key in sorted(trajectories):
        trajectory = trajectories[key]
        names = trajectory.get_arraynames()
        if "max_force_std" not in names:
            raise ValueError(f"trajectory {key} (TrajectoryData<{trajectory.pk}>) has no ensemble spreads")
        atoms_list = trajectory_frames(trajectory)
        count = len(atoms_list)
        explored = np.asarray(trajectory.get_stepids()) != 0
        frames.extend(atoms for atoms, keep in zip(atoms_list, explored) if keep)
        force_std.append(trajectory.get_array("max_force_std")[explored])
        if "polarization_std" in names:
            spread = np.linalg.norm(trajectory.get_array("polarization_std").reshape(count, -1), axis=1)
        else:
            spread = np.zeros(count)
        polarization_std.append(spread[explored])
        born = trajectory.get_array("max_born_charge_std") if "max_born_charge_std" in names else np.zeros(count)
        born_std.append(born[explored])
        alpha = (trajectory.get_array("polarizability_spread") if "polarizability_spread" in names
                 else np.zeros(count))
        alpha_std.append(alpha[explored])
        origins.extend(f"{trajectory.uuid}:{index}" for index in np.flatnonzero(explored))
        field = trajectory.get_array("efield").reshape(count, 3) if "efield" in names else np.zeros((count, 3))
        efields.extend(field[explored])
        sampled_at.extend([run_temperatures.get(key)] * int(explored.sum()))

    # per explored frame, over all runs (None without runs: nothing is classified, selected or indexed then)
    polarization_all, born_all, alpha_all = (np.concatenate(spreads) if spreads else None
                                             for spreads in (polarization_std, born_std, alpha_std))
    selected, statistics = select_candidates(
        frames,
        np.concatenate(force_std) if force_std else np.zeros(0),
        rules,
        polarization_std=polarization_all,
        born_charge_std=born_all,
        polarizability_std=alpha_all,
    )
    # spreads the MD did not record are zeros here: their ratio is 0, they upgrade nobody
    ratio = (response_spread_ratio(rules, born_all, alpha_all) if rules.response_threshold_factor is not None
             else None)
    candidates = []
    for index in selected:
        atoms = frames[index].copy()
        atoms.info = {"origin": origins[index], "efield": np.asarray(efields[index], dtype=float),
                      "response_spread": full_response_spread(born_all[index], polarization_all[index])}
        if ratio is not None:
            atoms.info["response_spread_ratio"] = float(ratio[index])
        if sampled_at[index] is not None:
            atoms.info[SAMPLED_TEMPERATURE_KEY] = float(sampled_at[index])
        candidates.append(atoms)
    statistics["selected_origins"] = [origins[index] for index in selected]
    return {"candidates": FramesData.from_atoms(candidates), "statistics": orm.Dict(statistics)}


class ExploreWorkChain(WorkChain):
    """Run ensemble MD from each structure under each field protocol at each temperature and select candidates."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.expose_inputs(MdCalculation, namespace="md", exclude=("model", "structure", "parameters"))
        spec.input("model", valid_type=ModelData, help="The ensemble whose disagreement drives the selection.")
        spec.input_namespace("structures", valid_type=orm.StructureData, dynamic=True, help="Starting structures.")
        spec.input(
            "parameters",
            valid_type=orm.Dict,
            help="MdCalculation parameters shared by all runs (steps, timestep, thermostat, interval, born_spread, "
            "seed); `field` and `temperature` come from `fields` and `temperatures`.",
        )
        spec.input("fields", valid_type=orm.List,
                   help="Field protocols (polmodel.dynamics.fields dicts), one MD run each.")
        spec.input("temperatures", valid_type=orm.List, help="Temperatures in K, one MD run each.")
        spec.input("selection", valid_type=orm.Dict, default=lambda: orm.Dict({}), help="SelectionCriteria values.")
        spec.outline(cls.validate_inputs, cls.run_md, cls.inspect_md, cls.select, cls.results)
        spec.output("candidates", valid_type=FramesData, help="Selected, unlabelled structures.")
        spec.output("statistics", valid_type=orm.Dict, help="Frame counts and accurate/candidate/failed fractions.")
        spec.output_namespace("trajectories", valid_type=orm.TrajectoryData, dynamic=True, required=False)
        # 400-449: inputs that cannot give an exploration.
        spec.exit_code(401, "ERROR_NO_STRUCTURES", message="no starting structures were given")
        spec.exit_code(402, "ERROR_UNKNOWN_SPECIES", message="structure {key} contains {unknown}, model species: {known}")
        spec.exit_code(403, "ERROR_INVALID_PARAMETERS", message="invalid exploration input: {error}")
        spec.exit_code(404, "ERROR_NOT_AN_ENSEMBLE", message="selection needs an ensemble; ModelData<{pk}> is one model")
        # 450-499: children that failed.
        spec.exit_code(450, "ERROR_ALL_MD_FAILED", message="all {count} MD runs failed")

    def validate_inputs(self):
        """Refuse inputs that would only fail later: no structure, unknown species, bad fields, a single model."""
        from polmodel.active_learning.selection import SelectionCriteria
        from polmodel.plugins.calculations import validate_md_parameters

        model = self.inputs.model
        if not self.inputs.structures:
            return self.exit_codes.ERROR_NO_STRUCTURES
        for key, structure in sorted(self.inputs.structures.items()):
            unknown = sorted(set(structure.get_symbols_set()) - set(model.species))
            if unknown:
                return self.exit_codes.ERROR_UNKNOWN_SPECIES.format(key=key, unknown=unknown, known=model.species)
        if model.ensemble_size < 2:
            return self.exit_codes.ERROR_NOT_AN_ENSEMBLE.format(pk=model.pk)
        if not self.inputs.fields.get_list() or not self.inputs.temperatures.get_list():
            return self.exit_codes.ERROR_INVALID_PARAMETERS.format(error="`fields` and `temperatures` must be non-empty")
        base = self.inputs.parameters.get_dict()
        for field in self.inputs.fields.get_list():
            for temperature in self.inputs.temperatures.get_list():
                trial = dict(base, field=field, temperature=float(temperature))
                message = validate_md_parameters(orm.Dict(trial), None)
                if message:
                    return self.exit_codes.ERROR_INVALID_PARAMETERS.format(error=message)
        try:
            SelectionCriteria.from_dict(self.inputs.selection.get_dict())
        except (TypeError, ValueError) as error:
            return self.exit_codes.ERROR_INVALID_PARAMETERS.format(error=error)
        return None

    def md_runs(self):
        """(key, structure, field, temperature) of every MD run, in a fixed order."""
        runs = []
        for structure_key, structure in sorted(self.inputs.structures.items()):
            for field_index, field in enumerate(self.inputs.fields.get_list()):
                for temperature in self.inputs.temperatures.get_list():
                    key = f"{structure_key}_field{field_index}_T{int(round(float(temperature)))}"
                    runs.append((key, structure, field, float(temperature)))
        return runs

    def run_md(self):
        base = self.inputs.parameters.get_dict()
        seed = base.get("seed", 0)
        futures = {}
        for index, (key, structure, field, temperature) in enumerate(self.md_runs()):
            inputs = self.exposed_inputs(MdCalculation, "md")
            inputs["model"] = self.inputs.model
            inputs["structure"] = structure
            inputs["parameters"] = orm.Dict(dict(base, field=field, temperature=temperature, seed=seed + index))
            inputs.setdefault("metadata", {})
            inputs["metadata"]["call_link_label"] = f"md_{key}"
            futures[f"md_{key}"] = self.submit(MdCalculation, **inputs)
        self.report(f"submitted {len(futures)} MD runs")
        return ToContext(**futures)

    def inspect_md(self):
        """Keep the finished trajectories; a failed MD run is reported and left out of the selection."""
        self.ctx.trajectories = {}
        keys = [f"md_{key}" for key, *_ in self.md_runs()]
        for key in keys:
            node = self.ctx[key]
            if node.is_finished_ok and "trajectory" in node.outputs:
                self.ctx.trajectories[key] = node.outputs.trajectory
            else:
                self.report(f"{key}: {node.process_label}<{node.pk}> failed (exit status {node.exit_status}); skipped")
        if not self.ctx.trajectories:
            return self.exit_codes.ERROR_ALL_MD_FAILED.format(count=len(keys))
        return None

    def select(self):
        temperatures = {f"md_{key}": temperature for key, _, _, temperature in self.md_runs()
                        if f"md_{key}" in self.ctx.trajectories}
        result = select_from_trajectories(criteria=self.inputs.selection, temperatures=orm.Dict(temperatures),
                                          **self.ctx.trajectories)
        self.ctx.candidates = result["candidates"]
        self.ctx.statistics = result["statistics"]
        stats = self.ctx.statistics.get_dict()
        self.report(
            f"{stats['num_frames']} frames: {stats['num_accurate']} accurate, {stats['num_candidates']} candidates, "
            f"{stats['num_failed']} failed (force spread mean {stats['max_force_std_mean']:.3g}, max "
            f"{stats['max_force_std_max']:.3g} eV/Å; window [{stats['criteria']['force_lower']:.3g}, "
            f"{stats['criteria']['force_upper']:.3g}]); {stats['num_selected']} selected after deduplication"
        )

    def results(self):
        self.out("candidates", self.ctx.candidates)
        self.out("statistics", self.ctx.statistics)
        self.out("trajectories", dict(self.ctx.trajectories))
