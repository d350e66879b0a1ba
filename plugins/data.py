"""AiiDA data types of polmodel.

`FramesData` (`polmodel.frames`): a set of labelled frames (DESIGN.md format) as one extended-XYZ file in the
node's repository, with searchable attributes. A dataset's history is a chain of such nodes.
"""
import io

from aiida import orm

FRAMES_FILENAME = "frames.xyz"


class FramesData(orm.Data):
    """Labelled frames: one structure at one field each, stored as extxyz."""

    @classmethod
    def from_atoms(cls, frames, **kwargs):
        """Build the node from a list of `ase.Atoms` carrying DESIGN.md labels in `info` / `arrays`."""
        import ase.io

        frames = list(frames)
        handle = io.StringIO()
        ase.io.write(handle, frames, format="extxyz")
        node = cls(**kwargs)
        node.base.repository.put_object_from_bytes(handle.getvalue().encode(), FRAMES_FILENAME)
        node.base.attributes.set("count", len(frames))
        node.base.attributes.set("species", sorted({s for atoms in frames for s in atoms.get_chemical_symbols()}))
        node.base.attributes.set("fields", [list(map(float, atoms.info.get("efield", (0.0, 0.0, 0.0)))) for atoms in frames])
        node.base.attributes.set("sources", sorted({str(atoms.info["source"]) for atoms in frames if "source" in atoms.info}))
        return node

    @property
    def count(self):
        return self.base.attributes.get("count")

    @property
    def species(self):
        return self.base.attributes.get("species")

    @property
    def fields(self):
        return self.base.attributes.get("fields")

    @property
    def sources(self):
        return self.base.attributes.get("sources")

    def get_atoms(self):
        """The frames as a list of `ase.Atoms`."""
        import ase.io

        text = self.base.repository.get_object_content(FRAMES_FILENAME, mode="r")
        if not text.strip():
            return []
        return ase.io.read(io.StringIO(text), index=":", format="extxyz")

    def write(self, path):
        """Write the extxyz file to `path` (for the `polmodel` executables)."""
        with open(path, "wb") as handle:
            handle.write(self.base.repository.get_object_content(FRAMES_FILENAME, mode="rb"))
