"""C-FIND responses on the fast path, seen by pynetdicom: implicit VR, tiny PDUs, many matches."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

from tests.helpers import ServerProcess, server_cli, write_config
from tools.generate import many_studies, small_instance, write


def test_many_matches_implicit_vr_small_pdus(tmp_path: Path) -> None:
    files = tmp_path / "files"
    specs = list(many_studies(400))
    for spec in specs:
        write(small_instance(spec), files)
    config = write_config(tmp_path / "cfg")
    data = tmp_path / "data"
    imported = server_cli("import", config, data, str(files))
    assert imported.returncode == 0, imported.stderr
    server = ServerProcess(data, config).start()
    try:
        ae = AE()
        ae.add_requested_context(FIND, [ImplicitVRLittleEndian])
        ae.maximum_pdu_size = 512  # forces identifiers to be split across PDUs
        assoc = ae.associate("127.0.0.1", server.port, ae_title="IMAGING")
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = "P*"
        query.PatientName = ""
        query.StudyInstanceUID = ""
        query.AccessionNumber = ""
        query.ModalitiesInStudy = ""
        query.InstitutionName = ""  # answered from stored metadata
        results = list(assoc.send_c_find(query, FIND))
        assoc.release()
    finally:
        server.stop()
    statuses = [s.Status for s, _ in results]
    assert statuses[-1] == 0x0000 and statuses.count(0xFF00) == len(specs)
    got = {str(ds.AccessionNumber): ds for s, ds in results if s.Status == 0xFF00}
    assert set(got) == {s.accession for s in specs}
    for spec in specs[:50]:
        ds = got[spec.accession]
        assert str(ds.PatientName) == spec.patient_name
        assert ds.StudyInstanceUID == spec.study_uid
        assert ds.ModalitiesInStudy == "OT"
        assert ds.InstitutionName == "TEST HOSPITAL"
