"""The node's background services: the loop they share (:mod:`~dicom_node.services.base`), job
running (:mod:`~dicom_node.services.jobs`), study assembly (:mod:`~dicom_node.services.assembly`),
export (:mod:`~dicom_node.services.export`) and retention (:mod:`~dicom_node.services.retention`)."""
