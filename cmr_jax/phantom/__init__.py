"""The synthetic cine-CMR phantom: a moving 3D heart with known volumes and LVEF (its parameters,
cycle and closed-form volumes in `heart_params`, its shapes in `heart_geometry`), the thorax
around it (`thorax`), scan planning and cine rendering per protocol family
(`scanner`), radiology reports (`reports`), one simulated study (`simulator`) and the synthetic
dataset's subjects and splits (`synthetic`)."""
