"""pip-installable core (``pip install -e .``) for users without ROS; ROS users build with colcon."""

from setuptools import find_packages, setup

setup(
    name="xvr_ros",
    version="0.1.0",
    description="Intraoperative X-ray to CT/MR registration (xvr) for ROS 2",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["xvr_ros", "xvr_ros.*"]),
    package_data={
        "xvr_ros.core.render": ["csrc/*.cpp"],
        "xvr_ros.core.register": ["quality_model.json", "quality_model_coarse.json", "quality_model_tracking.json"],
    },
    install_requires=["torch>=2.1", "numpy", "nibabel", "pydicom", "pillow", "scipy", "rosbags>=0.11", "matplotlib"],
    entry_points={"console_scripts": ["xvr-ros = xvr_ros.cli:main"]},
)
