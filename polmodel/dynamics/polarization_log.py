"""The P(t) file of `polmodel md`: the field, cell dipole and polarization of every step (or every
`polarization_interval` steps), streamed to `<trajectory>.polarization.csv` and flushed row by row, so that a
long or large run keeps nothing per step in memory and the dipole series is complete even where the extended-XYZ
trajectory is subsampled.

Format: one comment line `# polmodel md P(t) {json}` (formula, number of atoms, the starting cell and pbc, the
run's `md_*` settings, units), one line of column names (COLUMNS), then one comma-separated row per recorded
step, in step order. Units: time fs, field V/Å, dipole e·Å, polarization e/Å² (NaN for open boundaries), volume
Å³, energy (the electric enthalpy) and kinetic energy eV, temperature K.

A restarted run continues the file from the trajectory's last frame: rows after that step (written by the
interrupted run after its last checkpoint, and recomputed identically) are cut off first, so no step appears
twice.
"""
import gzip
import json
import warnings
from pathlib import Path

import numpy as np

COLUMNS = ("step", "time_fs", "efield_x", "efield_y", "efield_z", "dipole_x", "dipole_y", "dipole_z",
           "polarization_x", "polarization_y", "polarization_z", "volume_A3", "energy", "kinetic_energy",
           "temperature")
_MARK = "# polmodel md P(t) "
UNITS = {"time_fs": "fs", "efield": "V/Å", "dipole": "e·Å", "polarization": "e/Å²", "volume_A3": "Å³",
         "energy": "eV (electric enthalpy)", "kinetic_energy": "eV", "temperature": "K"}


class PolarizationLogError(ValueError):
    """A file that is not a `polmodel md` P(t) file."""


def polarization_log_path(trajectory_path):
    return Path(f"{trajectory_path}.polarization.csv")


def _format(value):
    return repr(float(value))   # the shortest text that reads back to the same double


class PolarizationLog:
    """Appends one row per recorded step to the P(t) file; every row is flushed when written.

    `PolarizationLog.start(path, atoms, settings)` begins a new file; `PolarizationLog.resume(path, step, atoms,
    settings)` continues one at `step` (the step the trajectory restarts from)."""

    def __init__(self, handle, interval):
        self._handle = handle
        self.interval = int(interval)

    @classmethod
    def start(cls, path, atoms, settings, interval=1):
        path = Path(path)
        handle = open(path, "w", encoding="utf-8")
        header = {"formula": atoms.get_chemical_formula(), "natoms": len(atoms), "cell": np.asarray(atoms.cell).tolist(),
                  "pbc": [bool(flag) for flag in atoms.pbc], "polarization_interval": int(interval),
                  "settings": {key: _jsonable(value) for key, value in settings.items()}, "units": UNITS}
        handle.write(_MARK + json.dumps(header) + "\n" + ",".join(COLUMNS) + "\n")
        handle.flush()
        return cls(handle, interval)

    @classmethod
    def resume(cls, path, step, atoms, settings, interval=1):
        """Keep the rows up to `step`, cut the rest; start a new file when there is none to continue."""
        path = Path(path)
        if not path.exists() or path.stat().st_size == 0:
            warnings.warn(f"{path} is missing: the restarted run's P(t) file starts at step {step}", stacklevel=3)
            return cls.start(path, atoms, settings, interval)
        last_kept, cut_at = _scan_for_cut(path, step)
        handle = open(path, "r+", encoding="utf-8")
        handle.truncate(cut_at)
        handle.seek(cut_at)
        expected = step - step % int(interval)
        if last_kept is not None and last_kept < expected:
            warnings.warn(f"{path} ends at step {last_kept}, before the restart's step {step}: the steps between "
                          "are missing from it", stacklevel=3)
        return cls(handle, interval)

    def due(self, step):
        return step % self.interval == 0

    def write(self, step, time_fs, atoms, calculator):
        """One row from the calculator's cached results at these positions (no new model call)."""
        results = calculator.results
        periodic = bool(np.all(atoms.pbc))
        polarization = results["polarization"] if periodic else np.full(3, np.nan)
        values = [time_fs, *calculator.results_efield, *results["dipole"], *polarization,
                  atoms.get_volume() if periodic else np.nan, results["energy"], atoms.get_kinetic_energy(),
                  atoms.get_temperature()]
        self._handle.write(f"{int(step)}," + ",".join(_format(value) for value in values) + "\n")
        self._handle.flush()

    def close(self):
        self._handle.close()


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    return value


def _scan_for_cut(path, step):
    """(the last step kept, the byte offset to cut at): the first row past `step`, or an unreadable row (the
    torn last line of a killed run), and everything after it go. Reads line by line (O(1) memory)."""
    with open(path, "rb") as handle:
        first = handle.readline()
        if not first.startswith(_MARK.encode()):
            raise PolarizationLogError(f"{path} is not a `polmodel md` P(t) file (no '{_MARK.strip()}' line)")
        handle.readline()   # column names
        offset, last_kept = handle.tell(), None
        for line in handle:
            try:
                row_step = int(line.split(b",", 1)[0])
                complete = line.endswith(b"\n") and line.count(b",") == len(COLUMNS) - 1
            except ValueError:
                complete = False
            if not complete or row_step > step:
                break
            last_kept = row_step
            offset += len(line)
    return last_kept, offset


def read_polarization_log(path):
    """(header dict, {column: (T,) array}) of a P(t) file, plain or gzipped (`.gz`)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        first = handle.readline()
        if not first.startswith(_MARK):
            raise PolarizationLogError(f"{path} is not a `polmodel md` P(t) file (no '{_MARK.strip()}' line)")
        header = json.loads(first[len(_MARK):])
        names = tuple(handle.readline().strip().split(","))
        if names != COLUMNS:
            raise PolarizationLogError(f"{path}: unexpected columns {names}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # numpy warns on a file with a header and no rows
            table = np.loadtxt(handle, delimiter=",", ndmin=2).reshape(-1, len(COLUMNS))
    return header, {name: table[:, index] for index, name in enumerate(COLUMNS)}


def polarization_frames(path):
    """The P(t) file as atom-less ASE frames for polmodel.analysis (the trajectory's per-frame info keys:
    time_fs, step, efield, dipole, polarization, energy, kinetic_energy, temperature; the first frame also holds
    the run's `md_*` settings and `formula`). Each frame's cell is the starting cell scaled to the row's volume
    (exact for every `polmodel md` thermostat: the NPT barostat is isotropic)."""
    from ase import Atoms

    header, columns = read_polarization_log(path)
    cell = np.asarray(header["cell"], dtype=float)
    periodic = all(header["pbc"])
    start_volume = abs(np.linalg.det(cell)) if periodic else np.nan
    frames = []
    for row in range(len(columns["step"])):
        scale = (columns["volume_A3"][row] / start_volume) ** (1.0 / 3.0) if periodic else 1.0
        frame = Atoms(cell=cell * scale, pbc=header["pbc"])
        info = {"time_fs": float(columns["time_fs"][row]), "step": int(columns["step"][row]),
                "energy": float(columns["energy"][row]), "kinetic_energy": float(columns["kinetic_energy"][row]),
                "temperature": float(columns["temperature"][row]), "formula": header["formula"]}
        for name in ("efield", "dipole", "polarization"):
            info[name] = np.array([columns[f"{name}_{axis}"][row] for axis in "xyz"])
        if not periodic:
            del info["polarization"]
        frame.info = info
        frames.append(frame)
    if frames:
        frames[0].info.update(header["settings"])
    return frames
