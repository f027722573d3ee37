"""Inside Slicer: the bridge's volume geometry agrees with Slicer's own NRRD reader and writer.

Run by CTest (``py_nomainwindow_LatentHarmonizeBridgeTest``) or by hand:
``Slicer --no-main-window --additional-module-paths <LatentHarmonize> --python-script LatentHarmonizeBridgeTest.py``.
"""
import os
import tempfile

import numpy as np
import slicer
import vtk


def volumeGeometry(node):
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def main():
    from latentharmonize import slicer_bridge

    folder = tempfile.mkdtemp()
    ijkToRAS = np.array([[-0.7, 0.0, 0.0, 12.0], [0.0, 0.0, 2.5, -30.0], [0.0, 0.8, 0.0, 45.0], [0, 0, 0, 1]])
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 1000
    volume = slicer.util.addVolumeFromArray(array, slicer.util.vtkMatrixFromArray(ijkToRAS), "geometry")

    # bridge writes -> Slicer reads: same voxels, same IJK-to-RAS
    written = slicer_bridge.write_input_volume(slicer.util.arrayFromVolume(volume), volumeGeometry(volume),
                                               os.path.join(folder, "bridge.nrrd"))
    loaded = slicer.util.loadVolume(str(written))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(loaded), array)
    np.testing.assert_allclose(volumeGeometry(loaded), ijkToRAS, atol=1e-6)

    # Slicer writes -> bridge reads: same voxels, same IJK-to-RAS
    path = os.path.join(folder, "slicer.nrrd")
    assert slicer.util.saveNode(volume, path)
    read = slicer_bridge.read_volume_array(path)
    np.testing.assert_array_equal(read.array, array)
    np.testing.assert_allclose(read.ijk_to_ras, ijkToRAS, atol=1e-6)


try:
    main()
except Exception:
    import traceback

    traceback.print_exc()
    slicer.util.exit(1)
else:
    print("LatentHarmonizeBridgeTest passed")
    slicer.util.exit(0)
