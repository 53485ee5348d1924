"""De-identification: the Basic Application Level Confidentiality Profile (PS3.15 E.2, Table
E.1-1), writing a de-identified copy of a study into the archive through the ingest path.

Actions per attribute (PS3.15 Table E.1-1a): D replace with a dummy value, Z empty (zero
length), X remove, U replace a UID by another, consistently within the copy (the same original
UID always gives the same new one, derived from a per-copy secret, so references between
instances stay intact and nothing leads back).  Private attributes are removed (the basic
profile keeps none, E.3.10 being an option not taken), as are curves (50xx) and overlays (60xx),
which Table E.1-1 removes.  The copy says so:
Patient Identity Removed YES, De-identification Method and its code sequence (PS3.16 CID 7050,
113100 "Basic Application Confidentiality Profile").  Pixel data are kept as they are (burnt-in
text is not looked for: Burned In Annotation is kept so a reader knows).
"""

from __future__ import annotations

import hashlib
import io
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from server.ingest import Ingestor

METHOD = "PS3.15 Basic Profile (imaging-server)"  # LO: at most 64 characters

# PS3.15 Table E.1-1 (the basic profile column), for the attributes found in practice.
_ACTIONS: dict[str, str] = {
    # identifying information about the patient
    "PatientName": "D",
    "PatientID": "D",
    "PatientBirthDate": "Z",
    "PatientBirthTime": "X",
    "PatientSex": "Z",
    "PatientAge": "X",
    "PatientSize": "X",
    "PatientWeight": "X",
    "PatientAddress": "X",
    "PatientTelephoneNumbers": "X",
    "PatientMotherBirthName": "X",
    "OtherPatientIDs": "X",
    "OtherPatientNames": "X",
    "OtherPatientIDsSequence": "X",
    "PatientBirthName": "X",
    "MilitaryRank": "X",
    "BranchOfService": "X",
    "MedicalRecordLocator": "X",
    "EthnicGroup": "X",
    "Occupation": "X",
    "PatientReligiousPreference": "X",
    "AdditionalPatientHistory": "X",
    "PatientComments": "X",
    "PatientInsurancePlanCodeSequence": "X",
    "IssuerOfPatientID": "X",
    "InsurancePlanIdentification": "X",
    "PregnancyStatus": "X",
    "SmokingStatus": "X",
    "ResponsiblePerson": "X",
    "ResponsibleOrganization": "X",
    # study, visit and request
    "StudyDate": "Z",
    "StudyTime": "Z",
    "AccessionNumber": "Z",
    "StudyID": "Z",
    "ReferringPhysicianName": "Z",
    "ReferringPhysicianAddress": "X",
    "ReferringPhysicianTelephoneNumbers": "X",
    "ReferringPhysicianIdentificationSequence": "X",
    "ConsultingPhysicianName": "X",
    "PhysiciansOfRecord": "X",
    "PhysiciansOfRecordIdentificationSequence": "X",
    "NameOfPhysiciansReadingStudy": "X",
    "PhysiciansReadingStudyIdentificationSequence": "X",
    "RequestingPhysician": "X",
    "RequestingService": "X",
    "StudyDescription": "X",
    "AdmittingDiagnosesDescription": "X",
    "AdmittingDiagnosesCodeSequence": "X",
    "AdmissionID": "X",
    "IssuerOfAdmissionID": "X",
    "CurrentPatientLocation": "X",
    "PatientState": "X",
    "RequestAttributesSequence": "X",
    "RequestedProcedureDescription": "X",
    "ReasonForStudy": "X",
    "RequestedProcedureComments": "X",
    "ReferencedPatientSequence": "X",
    "ReferencedStudySequence": "X",
    "StudyComments": "X",
    "InterpretationAuthor": "X",
    # series, equipment, acquisition
    "SeriesDate": "X",
    "SeriesTime": "X",
    "AcquisitionDate": "X",
    "AcquisitionTime": "X",
    "AcquisitionDateTime": "X",
    "ContentDate": "Z",
    "ContentTime": "Z",
    "InstanceCreationDate": "X",
    "InstanceCreationTime": "X",
    "SeriesDescription": "X",
    "OperatorsName": "X",
    "OperatorIdentificationSequence": "X",
    "PerformingPhysicianName": "X",
    "PerformingPhysicianIdentificationSequence": "X",
    "InstitutionName": "X",
    "InstitutionAddress": "X",
    "InstitutionalDepartmentName": "X",
    "StationName": "X",
    "DeviceSerialNumber": "X",
    "PlateID": "X",
    "DetectorID": "X",
    "GantryID": "X",
    "ProtocolName": "X",
    "PerformedProcedureStepID": "X",
    "PerformedProcedureStepDescription": "X",
    "PerformedProcedureStepStartDate": "X",
    "PerformedProcedureStepStartTime": "X",
    "ScheduledProcedureStepID": "X",
    "RequestedProcedureID": "X",
    "ImageComments": "X",
    "FrameComments": "X",
    "DerivationDescription": "X",
    "TextComments": "X",
    "TextString": "X",
    "ContentSequence": "X",
    "VerifyingObserverSequence": "X",
    "VerifyingObserverName": "X",
    "PersonName": "X",
    "Overlays": "X",
    "DataSetTrailingPadding": "X",
    "DigitalSignaturesSequence": "X",
    "OriginalAttributesSequence": "X",
    "ModifiedAttributesSequence": "X",
    "ReferencedPerformedProcedureStepSequence": "X",
    "ScheduledStepAttributesSequence": "X",
    "PerformedProcedureStepStatus": "X",
    "TimezoneOffsetFromUTC": "X",
}
_ACTION_BY_TAG = {int(t): a for k, a in _ACTIONS.items() if (t := tag_for_keyword(k)) is not None}
# UIDs that name things, not instances: kept (PS3.15 E.1.1: well-known UIDs are not replaced).
_KEEP_UIDS = frozenset(
    int(t)
    for k in (
        "SOPClassUID",
        "ReferencedSOPClassUID",
        "MediaStorageSOPClassUID",
        "TransferSyntaxUID",
        "ImplementationClassUID",
        "CodingSchemeUID",
        "ContextGroupExtensionCreatorUID",
        "MappingResourceUID",
        "RelatedGeneralSOPClassUID",
        "OriginalSpecializedSOPClassUID",
    )
    if (t := tag_for_keyword(k)) is not None
)


@dataclass
class Deidentifier:
    """One de-identified copy: the replacement identity and the UID mapping secret."""

    patient_id: str
    patient_name: str
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    _uids: dict[str, str] = field(default_factory=dict)

    def uid(self, original: str) -> str:
        if original not in self._uids:
            digest = hashlib.sha256(self.secret + original.encode()).digest()
            self._uids[original] = f"2.25.{int.from_bytes(digest[:16], 'big')}"
        return self._uids[original]

    def _clean(self, ds: Dataset) -> None:
        for element in list(ds):
            tag = int(element.tag)
            group = tag >> 16
            if group % 2 == 1 or 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF:
                del ds[element.tag]  # private attributes, curves, overlays
                continue
            action = _ACTION_BY_TAG.get(tag)
            if action == "X":
                del ds[element.tag]
            elif action == "Z":
                ds[element.tag] = DataElement(element.tag, element.VR, None)
            elif action == "D":
                continue  # set below from the pseudonym
            elif element.VR == "UI" and tag not in _KEEP_UIDS and element.value:
                values = element.value if element.VM > 1 else [element.value]
                new = [self.uid(str(v)) for v in values]
                element.value = new if element.VM > 1 else new[0]
            elif element.VR == "SQ":
                for item in element.value or []:
                    self._clean(item)

    def apply(self, data: bytes) -> bytes:
        ds = dcmread(io.BytesIO(data))
        self._clean(ds)
        ds.PatientName = self.patient_name
        ds.PatientID = self.patient_id
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = METHOD
        code = Dataset()
        code.CodeValue = "113100"
        code.CodingSchemeDesignator = "DCM"
        code.CodeMeaning = "Basic Application Confidentiality Profile"
        ds.DeidentificationMethodCodeSequence = Sequence([code])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()


def kept_keywords() -> Iterator[str]:
    """Attributes the profile names (documentation and tests)."""
    for tag in sorted(_ACTION_BY_TAG):
        yield keyword_for_tag(tag)


def copy_study(
    ingestor: Ingestor,
    paths: list[Path],
    patient_id: str,
    patient_name: str,
    institution: str | None,
) -> tuple[str, int]:
    """De-identify the given instance files into the archive; returns (new study UID, count)."""
    deid = Deidentifier(patient_id, patient_name)
    study_uid = ""
    for path in paths:
        result = ingestor.ingest(
            deid.apply(path.read_bytes()), source="deidentify", institution=institution
        )
        study_uid = result.study_instance_uid
    return study_uid, len(paths)
