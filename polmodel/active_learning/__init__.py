"""The decisions of the active-learning loop, as pure Python over numpy, ASE and polmodel.data: the strained and
displaced initial structures of a first training set (initial_structures.py), the schedule of exploration stages
(exploration.py) and the choice of the explored frames worth a DFT label (selection.py). The AiiDA workchain that
runs the loop, polmodel.workflows.active_learning, calls these functions; they never import AiiDA themselves."""
