"""Cached calculations in an exported archive: whether each one's original run is there, and reproducing it if not.

With caching on, AiiDA answers a calculation whose inputs hash like an earlier one's by copying that earlier node
(extra `_aiida_cached_from`: the original's UUID) instead of running the code. The copy's outputs are genuine
results of the code, but the run behind them is the original: an archive that holds the copy without the original
claims a run it cannot show. `verdi archive import` drops the `_aiida_cached_from` mark, so the check reads the
archive file itself (read-only, through the `core.sqlite_zip` storage that `verdi archive create` writes).

Where the original is lost (it lived in a profile that was never exported), the remedy is to run the same inputs
again with caching off: `reproduce_cached_calculation` reruns a copy (a rerun of its parent calculation first, when
the copy read a parent's folder, which is gone with the original machine) and records on the rerun which copy it
reproduces and how far their results are apart. The check then accepts a copy whose original is missing only if the
archive holds such a reproduction whose results agree.

The project's profiles run with caching off (aiida's default; `plugins/bootstrap.py` never turns it on), so a new
campaign has no copies at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from aiida import orm

CACHED_FROM_EXTRA = "_aiida_cached_from"
#: On a rerun: the UUID of the cached copy whose missing original it stands in for.
REPRODUCES_EXTRA = "polmodel_reproduces"
#: On a rerun: {result name: largest absolute difference from the copy's}, measured when the rerun finished.
DIFFERENCES_EXTRA = "polmodel_reproduction_differences"
#: The results compared, with the largest difference that still counts as the same run of the same code on the
#: same inputs (pw.x on another core count or BLAS sums in another order moves the energy by ~1e-8 eV, forces by
#: ~1e-6 eV/Å; a different input or pseudopotential moves them by orders of magnitude more).
RESULT_TOLERANCES = {
    "energy": 1e-5,             # eV (output_parameters)
    "electronic_phase": 1e-5,   # Berry phase, mod 2 (output_parameters)
    "ionic_phase": 1e-8,
    "forces": 1e-4,             # eV/Å (output_trajectory)
    "stress": 1e-2,             # GPa (output_trajectory)
}


@dataclass
class CachedRunReport:
    """What one archive holds of its cached calculations."""
    archive: str
    calculations: int = 0
    cached: list[str] = field(default_factory=list)
    originals_present: list[str] = field(default_factory=list)
    reproduced: dict[str, dict] = field(default_factory=dict)   # copy uuid -> {reproduction uuid, differences}
    missing: list[str] = field(default_factory=list)            # copies with neither original nor a reproduction
    missing_originals: dict[str, str] = field(default_factory=dict)   # copy uuid -> the absent original's uuid

    @property
    def whole(self):
        return not self.missing

    def summary(self):
        lines = [f"{self.archive}: {self.calculations} calculations, {len(self.cached)} cached copies, "
                 f"{len(self.originals_present)} with their original, {len(self.reproduced)} reproduced with "
                 f"caching off, {len(self.missing)} with neither"]
        for copy, record in sorted(self.reproduced.items()):
            worst = ", ".join(f"{key} {value:.1e}" for key, value in sorted(record["differences"].items()))
            lines.append(f"  {copy} reproduced by {record['reproduction']} ({worst})")
        lines += [f"  {copy}: original {self.missing_originals[copy]} is not in the archive and nothing reproduces it"
                  for copy in self.missing]
        return "\n".join(lines)


def _archive_storage(path):
    from aiida.storage.sqlite_zip.backend import SqliteZipBackend
    return SqliteZipBackend(SqliteZipBackend.create_profile(str(path)))


def _cached_copies(storage) -> list[tuple[str, str]]:
    """(copy uuid, original uuid) of every cached calculation in `storage`."""
    return orm.QueryBuilder(backend=storage).append(
        orm.CalculationNode, filters={"extras": {"has_key": CACHED_FROM_EXTRA}},
        project=["uuid", f"extras.{CACHED_FROM_EXTRA}"]).all()


def cached_runs_in_archive(path) -> CachedRunReport:
    """Read archive file `path` (without importing it) and sort its cached calculations: original present, reproduced
    (a rerun with caching off whose results agree within RESULT_TOLERANCES), or missing."""
    storage = _archive_storage(path)
    try:
        def query():
            return orm.QueryBuilder(backend=storage)

        report = CachedRunReport(archive=str(path))
        report.calculations = query().append(orm.CalculationNode).count()
        copies = _cached_copies(storage)
        originals = {uuid for uuid, in query().append(
            orm.Node, filters={"uuid": {"in": [source for _, source in copies] or [""]}}, project="uuid").all()}
        reproductions = {}
        for uuid, reproduces, differences, exit_status in query().append(
                orm.CalculationNode, filters={"extras": {"has_key": REPRODUCES_EXTRA}},
                project=["uuid", f"extras.{REPRODUCES_EXTRA}", f"extras.{DIFFERENCES_EXTRA}",
                         "attributes.exit_status"]).all():
            if exit_status == 0 and reproduction_agrees(differences):
                reproductions[reproduces] = {"reproduction": uuid, "differences": differences}
        for copy, source in copies:
            report.cached.append(copy)
            if source in originals:
                report.originals_present.append(copy)
            elif copy in reproductions:
                report.reproduced[copy] = reproductions[copy]
            else:
                report.missing.append(copy)
                report.missing_originals[copy] = source
        return report
    finally:
        storage.close()


def reproduction_agrees(differences) -> bool:
    """True when a rerun's recorded differences from its copy are all within RESULT_TOLERANCES (and some result
    was compared at all)."""
    if not differences:
        return False
    return all(key in RESULT_TOLERANCES and value <= RESULT_TOLERANCES[key] for key, value in differences.items())


def result_differences(copy: orm.CalcJobNode, rerun: orm.CalcJobNode) -> dict[str, float]:
    """Largest absolute difference of each result in RESULT_TOLERANCES that both calculations produced."""
    differences = {}
    if "output_parameters" in copy.outputs and "output_parameters" in rerun.outputs:
        first, second = copy.outputs.output_parameters.get_dict(), rerun.outputs.output_parameters.get_dict()
        for key in RESULT_TOLERANCES:
            if isinstance(first.get(key), (int, float)) and isinstance(second.get(key), (int, float)):
                differences[key] = abs(float(first[key]) - float(second[key]))
    if "output_trajectory" in copy.outputs and "output_trajectory" in rerun.outputs:
        first, second = copy.outputs.output_trajectory, rerun.outputs.output_trajectory
        for key in RESULT_TOLERANCES:
            if key in first.get_arraynames() and key in second.get_arraynames():
                differences[key] = float(np.max(np.abs(first.get_array(key) - second.get_array(key))))
    return differences


def restore_cached_marks(path) -> int:
    """Put back on the nodes of the loaded profile the `_aiida_cached_from` marks that `verdi archive import` of
    archive `path` dropped (the same nodes, by UUID); returns how many were restored."""
    storage = _archive_storage(path)
    try:
        copies = _cached_copies(storage)
    finally:
        storage.close()
    for uuid, source in copies:
        orm.load_node(uuid).base.extras.set(CACHED_FROM_EXTRA, source)
    return len(copies)


def reproduce_cached_calculation(copy: orm.CalcJobNode, reruns: dict[str, orm.CalcJobNode]) -> orm.CalcJobNode:
    """Run `copy`'s inputs again with caching off and mark the rerun as its reproduction.

    A copy that read a parent calculation's folder (`parent_folder`, as a Berry-phase nscf run reads its scf) gets the
    folder of the parent's rerun, which must be in `reruns` (keyed by the parent's UUID): the parent's own folder is
    on the machine that ran the original. Returns the rerun; raises RuntimeError if it did not finish cleanly.
    """
    from aiida.engine import run_get_node
    from aiida.manage.caching import disable_caching

    builder = copy.get_builder_restart()
    if "parent_folder" in copy.inputs:
        parent = copy.inputs.parent_folder.creator
        if parent.uuid not in reruns:
            raise RuntimeError(f"{copy.uuid} reads the folder of {parent.uuid}: reproduce that one first")
        builder.parent_folder = reruns[parent.uuid].outputs.remote_folder
    with disable_caching():
        _, rerun = run_get_node(builder)
    if not rerun.is_finished_ok:
        raise RuntimeError(f"the rerun of {copy.uuid} ({rerun.pk}) failed with exit status {rerun.exit_status}")
    rerun.base.extras.set_many({REPRODUCES_EXTRA: copy.uuid, DIFFERENCES_EXTRA: result_differences(copy, rerun)})
    return rerun


def reproduce_missing_originals(path, log=print) -> list[orm.CalcJobNode]:
    """Rerun, in the loaded profile (into which archive `path` was imported), every cached copy of `path` whose
    original is missing and which nothing reproduces yet, parents first. Restores the cached marks on the way."""
    restore_cached_marks(path)
    report = cached_runs_in_archive(path)
    existing = orm.QueryBuilder().append(orm.CalcJobNode, filters={"extras": {"has_key": REPRODUCES_EXTRA}}).all(flat=True)
    reruns = {node.base.extras.get(REPRODUCES_EXTRA): node for node in existing}
    pending = [orm.load_node(uuid) for uuid in report.missing if uuid not in reruns]
    # parents (no parent_folder) before the runs that read their folders
    pending.sort(key=lambda node: ("parent_folder" in node.inputs, node.ctime))
    done = []
    for copy in pending:
        rerun = reproduce_cached_calculation(copy, reruns)
        reruns[copy.uuid] = rerun
        done.append(rerun)
        log(f"{copy.uuid} reproduced by {rerun.pk} ({rerun.uuid}): {rerun.base.extras.get(DIFFERENCES_EXTRA)}")
    return done
