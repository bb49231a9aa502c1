"""Engine: evaluation (``retina.engine.evaluate``) and prediction on files
(``retina.engine.predict``). Import the submodules directly; this package imports nothing so that
``import retina.engine.evaluate`` stays light."""
