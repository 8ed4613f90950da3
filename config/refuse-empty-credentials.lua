-- Fail closed: Orthanc answers no HTTP request without a user name.
-- orthanc.json's RegisteredUsers reads ${ORTHANC_USER} / ${ORTHANC_PASSWORD} from Orthanc's
-- environment; where they are unset Orthanc substitutes empty strings, and an empty user name
-- with an empty password would be let in (HTTP 200, with RemoteAccessAllowed). This filter
-- refuses (403) every request whose user name is empty, whatever the configuration says,
-- and requests made with authentication switched off. Loaded before the routing script.

function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if username == nil or username == "" then
    print("refused HTTP " .. method .. " " .. uri .. " from " .. ip ..
          ": no user name (set ORTHANC_USER / ORTHANC_PASSWORD, or the host's credentials file)")
    return false
  end
  return true
end
