-- Orthanc auto-routing for cxr-node: forward chest radiographs (CR/DX) to the node.
-- Never forwards SR/KO/PR or anything the node itself sent, so an SR can never loop.
-- The modality name "cxr-node" is the DicomModalities entry in orthanc.json.

local ROUTED_MODALITIES = { CR = true, DX = true }
local NODE_AET = "CXR_NODE"
local NON_IMAGE_SOP_CLASS_PREFIXES = {
  "1.2.840.10008.5.1.4.1.1.88.",   -- Structured Reports
  "1.2.840.10008.5.1.4.1.1.11.",   -- Presentation States
}

local function isNonImage(sopClass)
  for _, prefix in ipairs(NON_IMAGE_SOP_CLASS_PREFIXES) do
    if string.sub(sopClass or "", 1, string.len(prefix)) == prefix then
      return true
    end
  end
  return false
end

-- How one instance is sent (python -m bench route swaps this function to compare ways).
local function route(instanceId)
  SendToModality(instanceId, "cxr-node")
end
-- end of route

function OnStoredInstance(instanceId, tags, metadata, origin)
  local modality = tags["Modality"]
  if not ROUTED_MODALITIES[modality] then
    return
  end
  if isNonImage(tags["SOPClassUID"]) or origin["RemoteAet"] == NODE_AET then
    return
  end
  print("cxr-node: routing " .. instanceId .. " (" .. modality .. ") to cxr-node")
  route(instanceId)
end
