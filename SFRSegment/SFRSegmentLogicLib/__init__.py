"""What the SFRSegment module's Logic does, in parts that run without the Slicer application where they can.

* :mod:`.process`: the engine's child process, its JSON-lines progress, cancel (standard library only);
* :mod:`.nodes`: Slicer nodes ↔ files and scene queries (MRML classes, VTK, numpy: runs under ``slicer-core``);
* :mod:`.jobs`: job folders, the run configuration, the engine's command lines, a job's state, importing results
  (as ``nodes``);
* :mod:`.plans`: the plan of a run before it starts (the engine's ``run --plan-only`` on the exported inputs, in a
  temporary folder), and its estimated time on this computer (as ``nodes``);
* :mod:`.runs`: starting the engine on a job folder, following it to its end, recording how it ended (as ``nodes``);
* :mod:`.history`: past jobs: listing them, finding the unfinished one the scene would make again, reopening,
  deleting (as ``nodes``);
* :mod:`.review`: the review queue of a finished job, least confident first, with the nodes each row shows (as
  ``nodes``);
* :mod:`.dependencies`: installing the engine's packages (needs the Slicer application).
* :mod:`.hardware`: whether the computer has a CUDA GPU, which the preset of a new parameter node follows (standard
  library only).

``SFRSegment.SFRSegmentLogic`` ties them together and adds what needs the application: the scene, the interpreter
``PythonSlicer``, Qt timers and dialogs.
"""
