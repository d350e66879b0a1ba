"""AiiDA data types of polmodel.

`FramesData` (`polmodel.data.frames`): a set of labelled frames (docs/conventions.md) as one extended-XYZ file in the
node's repository, with searchable attributes. A dataset's history is a chain of such nodes.
"""
import io

from aiida import orm
from aiida.engine import calcfunction

FRAMES_FILENAME = "frames.xyz"


class FramesData(orm.Data):
    """Labelled frames: one structure at one field each, stored as extxyz."""

    @classmethod
    def from_atoms(cls, frames, **kwargs):
        """Build the node from a list of `ase.Atoms` carrying the labels of docs/conventions.md in `info` / `arrays`."""
        import ase.io

        from polmodel.data.frames import frame_efield

        frames = list(frames)
        handle = io.StringIO()
        ase.io.write(handle, frames, format="extxyz")
        node = cls(**kwargs)
        node.base.repository.put_object_from_bytes(handle.getvalue().encode(), FRAMES_FILENAME)
        node.base.attributes.set("count", len(frames))
        node.base.attributes.set("species", sorted({s for atoms in frames for s in atoms.get_chemical_symbols()}))
        node.base.attributes.set("fields", [list(map(float, frame_efield(atoms))) for atoms in frames])
        node.base.attributes.set("sources", sorted({str(atoms.info["source"]) for atoms in frames if "source" in atoms.info}))
        return node

    @property
    def count(self):
        return self.base.attributes.get("count")

    @property
    def species(self):
        return self.base.attributes.get("species")

    @property
    def efields(self):
        """The field (V/Å) of every frame. (Not `fields`: aiida-core reserves that name for QueryBuilder fields.)"""
        return self.base.attributes.get("fields")

    @property
    def sources(self):
        return self.base.attributes.get("sources")

    def get_atoms(self, normalize=True):
        """The frames as a list of `ase.Atoms`.

        With `normalize` (default) every label sits in `info` / `arrays` as docs/conventions.md specifies
        (`polmodel.data.frames.normalize_frames`); ASE's extxyz reader alone would move energy, forces, stress, dipole
        and Born charges into a SinglePointCalculator.
        """
        import ase.io

        text = self.base.repository.get_object_content(FRAMES_FILENAME, mode="r")
        if not text.strip():
            return []
        frames = ase.io.read(io.StringIO(text), index=":", format="extxyz")
        if normalize:
            from polmodel.data.frames import normalize_frames

            frames = normalize_frames(frames)
        return frames

    def write(self, path):
        """Write the extxyz file to `path` (for the `polmodel` executables)."""
        with open(path, "wb") as handle:
            handle.write(self.base.repository.get_object_content(FRAMES_FILENAME, mode="rb"))

    @classmethod
    def concatenate(cls, frame_sets, added_info=None, **kwargs):
        """One set holding the frames of `frame_sets` in order; `added_info` (one dict per set, or None) adds its
        entries to the info of every frame of that set that lacks them.

        The extxyz texts are joined as they are (no parse/write round trip), so no label can be lost or rounded.
        """
        frame_sets = list(frame_sets)
        added_info = list(added_info) if added_info is not None else [None] * len(frame_sets)
        content = b""
        for frame_set, info in zip(frame_sets, added_info):
            text = frame_set.base.repository.get_object_content(FRAMES_FILENAME, mode="rb")
            if info:
                text = _with_info(text, info)
            if text.strip():
                content += text if text.endswith(b"\n") else text + b"\n"
        node = cls(**kwargs)
        node.base.repository.put_object_from_bytes(content, FRAMES_FILENAME)
        node.base.attributes.set("count", sum(frame_set.count for frame_set in frame_sets))
        node.base.attributes.set("species", sorted({s for frame_set in frame_sets for s in frame_set.species}))
        node.base.attributes.set("fields", [field for frame_set in frame_sets for field in frame_set.efields])
        node.base.attributes.set("sources", sorted({s for frame_set in frame_sets for s in frame_set.sources}))
        return node


def _with_info(text, info):
    """The extxyz `text` (bytes) with `info`'s entries appended to the comment line of each frame lacking them:
    the labels' lines stay byte for byte as they were."""
    from ase.io.extxyz import key_val_dict_to_str, key_val_str_to_dict

    lines = text.decode().splitlines(keepends=True)
    index = 0
    while index < len(lines):
        if not lines[index].strip():
            index += 1
            continue
        count = int(lines[index])
        comment = lines[index + 1].rstrip("\n")
        missing = {key: value for key, value in info.items() if key not in key_val_str_to_dict(comment)}
        if missing:
            lines[index + 1] = f"{comment} {key_val_dict_to_str(missing)}\n"
        index += count + 2
    return "".join(lines).encode()


@calcfunction
def merge_frames(sampled_temperatures=None, **frame_sets):
    """Merge labelled-frame sets into one (inputs in sorted key order), keeping the provenance of every set.

    `sampled_temperatures` (a Dict: set key -> K) gives each frame of those sets `info['sampled_temperature_K']`,
    the temperature of the MD run its structure was sampled from (the active-learning loop's labels of explored
    candidates); a model trained on the merged set records the highest (polmodel/data/domain.py)."""
    from polmodel.data.domain import SAMPLED_TEMPERATURE_KEY

    temperatures = sampled_temperatures.get_dict() if sampled_temperatures is not None else {}
    keys = sorted(frame_sets)
    return FramesData.concatenate((frame_sets[key] for key in keys),
                                  added_info=[{SAMPLED_TEMPERATURE_KEY: float(temperatures[key])}
                                              if key in temperatures else None for key in keys])


MODEL_FILENAME = "model.pt"


class ModelHashError(ValueError):
    """The model file in a `ModelData` node does not match the sha256 recorded when the node was made."""


def _sha256_of_bytes(content):
    import hashlib

    return hashlib.sha256(content).hexdigest()


def describe_model(model_or_ensemble):
    """The searchable facts of a loaded `PolModel` / `PolEnsemble`: kind, species, cutoff, architecture, size. The
    architecture is stored under the attribute "hyperparameters", the key of every archived ModelData node."""
    members = getattr(model_or_ensemble, "members", None)
    if members is not None:
        first = members[0]
        return {
            "kind": "ensemble",
            "ensemble_size": len(members),
            "species": list(first.species),
            "cutoff": float(first.cutoff),
            "hyperparameters": dict(first.architecture),
        }
    return {
        "kind": "model",
        "ensemble_size": 1,
        "species": list(model_or_ensemble.species),
        "cutoff": float(model_or_ensemble.cutoff),
        "hyperparameters": dict(model_or_ensemble.architecture),
    }


class ModelData(orm.Data):
    """A trained model or ensemble file (`polmodel.nn.serialization` format) with its facts as attributes.

    The sha256 of the file is recorded at creation; `verify()` recomputes it before every use, so a file that
    changed underneath the provenance graph is refused rather than silently used.
    """

    @classmethod
    def from_file(cls, path, metrics=None, **kwargs):
        """Build the node from a model file; the file is loaded once to read (and validate) its facts."""
        from polmodel.nn.serialization import load

        with open(path, "rb") as handle:
            content = handle.read()
        facts = describe_model(load(path))
        node = cls(**kwargs)
        node.base.repository.put_object_from_bytes(content, MODEL_FILENAME)
        for key, value in facts.items():
            node.base.attributes.set(key, value)
        node.base.attributes.set("sha256", _sha256_of_bytes(content))
        node.base.attributes.set("metrics", dict(metrics or {}))
        return node

    @property
    def kind(self):
        return self.base.attributes.get("kind")

    @property
    def ensemble_size(self):
        return self.base.attributes.get("ensemble_size")

    @property
    def species(self):
        return self.base.attributes.get("species")

    @property
    def cutoff(self):
        return self.base.attributes.get("cutoff")

    @property
    def architecture(self):
        """The PolModel keywords of the (first) member, from the attribute "hyperparameters" (its stored name)."""
        return self.base.attributes.get("hyperparameters")

    @property
    def hyperparameters(self):
        """Alias of `architecture`, its name in earlier releases."""
        return self.architecture

    @property
    def metrics(self):
        return self.base.attributes.get("metrics", {})

    @property
    def sha256(self):
        return self.base.attributes.get("sha256")

    def get_content(self):
        """The model file's bytes, after checking them against the recorded sha256."""
        content = self.base.repository.get_object_content(MODEL_FILENAME, mode="rb")
        actual = _sha256_of_bytes(content)
        if actual != self.sha256:
            raise ModelHashError(
                f"model file of ModelData<{self.pk or 'unstored'}> has sha256 {actual}, but {self.sha256} was recorded "
                "when the node was created: the file is corrupt or was replaced; refusing to use it"
            )
        return content

    def verify(self):
        """Raise `ModelHashError` unless the stored file still has the recorded sha256."""
        self.get_content()
        return self.sha256

    def write(self, path):
        """Write the verified model file to `path`."""
        with open(path, "wb") as handle:
            handle.write(self.get_content())

    def load(self):
        """The verified model / ensemble as a torch module (`polmodel.nn.serialization.load`)."""
        import tempfile

        from polmodel.nn.serialization import load

        with tempfile.TemporaryDirectory() as tmpdir:
            path = f"{tmpdir}/{MODEL_FILENAME}"
            self.write(path)
            return load(path)
