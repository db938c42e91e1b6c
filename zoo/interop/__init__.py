"""Interoperability with Hugging Face transformers, both ways out of zoo.

* :mod:`.export`: :func:`zoo.export` writes a zoo model as the transformers family that represents it
  exactly (:mod:`.dense`, :mod:`.sparse`, :mod:`.deepseek`, each the inverse of the importer of the same name
  in :mod:`zoo.checkpoint.importers`; :mod:`.mapping` the tensor moves, :mod:`.layout` what a family must
  represent), or in zoo's own transformers form (``model_type: zoo``).
* :mod:`.hf`: the ``PreTrainedModel`` wrapper and config of that form, registered with transformers' Auto
  classes. It imports transformers, so nothing imports it at ``import zoo``: :mod:`.registration` registers
  it when transformers itself is imported.
"""
