"""The package's QoS profiles, in one place.

Images: with Fast DDS as shipped in the PyPI wheels, a best-effort subscription loses most
mono16 images of 512x512 px and larger (the default shared-memory segment holds 0.5 MB; bigger
samples go as UDP fragments and one lost fragment loses the image), so the image nodes follow the
publishers' reliability and drivers should publish reliable (README; for video rates of large
images also config/fastdds_large_images.xml).
"""

from __future__ import annotations

from collections.abc import Iterable

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

__all__ = ["DROPPED", "IMAGE_QOS_CHOICES", "LATCHED", "TF", "image_qos", "offered_reliability"]

#: A latched topic (``xvr/model_info``): reliable, transient local, depth 1, so a late subscriber
#: still receives the last message.
LATCHED = QoSProfile(
    depth=1,
    history=HistoryPolicy.KEEP_LAST,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)

#: ``/tf`` as ``tf2_ros.TransformBroadcaster`` publishes it: reliable, volatile, depth 100.
TF = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)

#: Stamps of dropped frames (``std_msgs/Header``): reliable and deep enough for a burst, so
#: every drop is counted exactly once downstream.
DROPPED = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)

#: Values of the image nodes' ``image_qos`` parameter.
IMAGE_QOS_CHOICES = ("auto", "reliable", "best_effort")

# As ROS's default profile. A reliable writer drops its oldest unacknowledged sample beyond this
# depth (the reader sees it as lost), so a busy receiver needs a few in hand; each 2048x2048
# mono16 image is 8 MB.
_IMAGE_DEPTH = 10


def image_qos(reliability: str) -> QoSProfile:
    """QoS of an image (or CameraInfo) subscription: ``"reliable"`` or ``"best_effort"``,
    keep last 10, volatile."""
    policies = {"reliable": ReliabilityPolicy.RELIABLE, "best_effort": ReliabilityPolicy.BEST_EFFORT}
    if reliability not in policies:
        raise ValueError(f"image reliability must be one of {sorted(policies)}, got {reliability!r}")
    return QoSProfile(depth=_IMAGE_DEPTH, history=HistoryPolicy.KEEP_LAST, reliability=policies[reliability])


def offered_reliability(publishers: Iterable) -> str | None:
    """The reliability a subscriber should request to hear every one of ``publishers``
    (``TopicEndpointInfo`` from ``Node.get_publishers_info_by_topic``), as ``ros2 bag record``
    chooses it: ``"reliable"`` if all offer reliable, ``"best_effort"`` if any offers best
    effort, None without publishers."""
    offered = [info.qos_profile.reliability for info in publishers]
    if not offered:
        return None
    return "reliable" if all(r == ReliabilityPolicy.RELIABLE for r in offered) else "best_effort"
