"""Train an ensemble on labelled data another code published, with the source in the provenance graph.

A *source card* (YAML; `data/allegro_pol/SiO2.yaml` is one) names the file, its origin (repository, commit, path,
sha256, licence), the label mapping (a convention of `polmodel.data.external.CONVENTIONS`, a `mapping` of
LabelMapping fields, or both: the mapping's fields override the convention's) and the TrainCalculation parameters.
`get_builder_from_card` stores the published file and its origin, imports the frames with the
`import_external_frames` calcfunction and returns a TrainEnsembleWorkChain builder: the same TrainCalculation the
active-learning loop trains with. `polmodel launch train CARD` runs it.
"""
import pathlib

import yaml
from aiida import orm

CARD_KEYS = {"file", "origin", "convention", "mapping", "training"}


def read_source_card(path):
    """The card as a dict with `file` resolved against the card's folder and the licence text read in;
    ValueError naming what is wrong."""
    from polmodel.data.external import LabelMapping
    from polmodel.plugins.calculations import TRAIN_PARAMETER_TYPES, validate_train_parameters
    from polmodel.plugins.external import validate_origin

    path = pathlib.Path(path)
    try:
        card = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"source card {path}: not a readable YAML file ({error})") from error
    if not isinstance(card, dict):
        raise ValueError(f"source card {path}: expected a mapping with keys {sorted(CARD_KEYS)}")
    unknown = sorted(set(card) - CARD_KEYS)
    if unknown or "file" not in card or "origin" not in card:
        raise ValueError(f"source card {path}: needs `file` and `origin`, may have {sorted(CARD_KEYS)}; "
                         f"unknown: {unknown}")
    card["file"] = path.parent / card["file"]
    if not card["file"].is_file():
        raise ValueError(f"source card {path}: file {card['file']} does not exist")
    origin = dict(card["origin"])
    message = validate_origin(origin)
    if message:
        raise ValueError(f"source card {path}: {message}")
    licence_file = origin.pop("licence_file", None)
    if licence_file is not None:
        try:
            origin["licence_text"] = (path.parent / licence_file).read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"source card {path}: licence_file {licence_file}: {error}") from error
    card["origin"] = origin
    try:
        mapping = LabelMapping.from_convention(card.get("convention", "polmodel"), card.get("mapping"))
    except (ValueError, TypeError) as error:
        raise ValueError(f"source card {path}: {error}") from error
    card["mapping"] = mapping.as_dict()
    training = dict(card.get("training") or {})
    message = validate_train_parameters(orm.Dict(training), None)
    if message:
        raise ValueError(f"source card {path}: training: {message} (keys: {sorted(TRAIN_PARAMETER_TYPES)})")
    card["training"] = training
    return card


def import_card_frames(card):
    """The FramesData of the card's file, made by `import_external_frames` from the stored file and its origin."""
    from polmodel.plugins.external import import_external_frames, source_file_node

    source = source_file_node(card["file"], card["origin"])
    return import_external_frames(source, orm.Dict(card["origin"]), orm.Dict(card["mapping"]))


def get_builder_from_card(card, polmodel_code, checkpoint=None):
    """A TrainEnsembleWorkChain builder that trains on the card's imported frames with its `training` settings;
    `checkpoint` (FolderData, a stopped training's `checkpoint` output) resumes that training."""
    from polmodel.workflows.train_ensemble import TrainEnsembleWorkChain

    if not isinstance(card, dict):
        card = read_source_card(card)
    parameters = dict(card["training"])
    builder = TrainEnsembleWorkChain.get_builder()
    builder.frames = import_card_frames(card)
    builder.ensemble_size = orm.Int(parameters.pop("ensemble_size", 3))
    builder.train.code = polmodel_code
    builder.train.parameters = orm.Dict(parameters)
    if checkpoint is not None:
        builder.train.checkpoint = checkpoint
    builder.metadata.label = f"train on {card['origin']['path']}"
    return builder
