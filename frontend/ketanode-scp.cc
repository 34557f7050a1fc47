// ketanode-scp: the native receive front end of the ketanode DICOM node.
//
// A multi-threaded DICOM Storage SCP built on DCMTK 3.6.7 (DcmSCPPool /
// DcmThreadSCP). One listener thread accepts TCP connections and reads the
// A-ASSOCIATE-RQ; each association is then served by its own worker thread.
//
// Durability promise: a C-STORE is answered with Success (0x0000) only after
// the received file has been fsynced, renamed from "<name>.part" to
// "<name>.dcm" and the incoming directory itself has been fsynced.
//
// Every event is reported on stdout as one tab-separated line (see
// frontend/README.md for the protocol); a Python supervisor reads them.
// Dataset contents are never printed; DCMTK's own logger writes to stderr at
// WARN level or quieter.
//
// Build: scripts/build-frontend.sh (g++ -std=c++17 -O2 -Wall ... -ldcmnet
// -ldcmdata -loflog -lofstd -lpthread).

#include "dcmtk/config/osconfig.h"  // must come first

#include "dcmtk/dcmdata/dcdict.h"
#include "dcmtk/dcmdata/dcuid.h"
#include "dcmtk/dcmnet/assoc.h"
#include "dcmtk/dcmnet/dimse.h"
#include "dcmtk/dcmnet/dul.h"
#include "dcmtk/dcmnet/scppool.h"
#include "dcmtk/dcmnet/scpthrd.h"
#include "dcmtk/oflog/oflog.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <ctime>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

namespace {

// ---------------------------------------------------------------------------
// Options (filled once in main, read-only afterwards, so safe to share).

struct Options {
    unsigned long port = 0;
    std::string bind = "0.0.0.0";
    std::string aet;
    std::string incoming;
    std::string contexts;
    unsigned long maxAssociations = 0;
    unsigned long acseTimeout = 30;
    unsigned long dimseTimeout = 60;
    unsigned long maxPdu = 0;
    std::set<std::pair<std::string, std::string>> allow;  // (calling AE, IP, "*" or CIDR)
};

Options g_opt;

// Does the allow-list entry's address (an IPv4 address, "*" for any, or an IPv4 network
// in CIDR form such as "10.1.2.0/24", as node.allowed_callers accepts) cover this peer?
bool addressCovers(const std::string& allowed, const std::string& ip) {
    if (allowed == "*" || allowed == ip) return true;
    const size_t slash = allowed.find('/');
    if (slash == std::string::npos) return false;
    in_addr net{}, peer{};
    if (inet_pton(AF_INET, allowed.substr(0, slash).c_str(), &net) != 1) return false;
    if (inet_pton(AF_INET, ip.c_str(), &peer) != 1) return false;
    char* end = nullptr;
    const long bits = std::strtol(allowed.c_str() + slash + 1, &end, 10);
    if (end == allowed.c_str() + slash + 1 || *end != '\0' || bits < 0 || bits > 32) return false;
    const uint32_t mask = bits == 0 ? 0u : htonl(~0u << (32 - bits));
    return (net.s_addr & mask) == (peer.s_addr & mask);
}

bool callerAllowed(const std::string& calling, const std::string& ip) {
    if (g_opt.allow.empty()) return true;
    for (const auto& [ae, address] : g_opt.allow)
        if (ae == calling && addressCovers(address, ip)) return true;
    return false;
}

// Accepted presentation contexts, grouped by transfer syntax list (in our
// order of preference): each entry is (transfer syntaxes, abstract syntaxes).
// Built once in main; read-only while associations are served.
std::vector<std::pair<std::vector<std::string>, std::vector<std::string>>> g_contextGroups;

// Set by the signal handler only (async-signal-safe); polled by the listener.
volatile sig_atomic_t g_stop = 0;

// Process-wide association serial (1, 2, ...), shared by the listener (pool
// rejections) and the workers (everything else).
std::atomic<unsigned long> g_assocSerial{0};

// What every file name of this run starts with: the process id and the start time in
// nanoseconds. Unique across restarts, also where process ids repeat (a container's
// processes get the same ids each time), so a new run never takes the name of a file that
// an earlier run acknowledged and the node has not indexed yet.
std::string g_runPrefix;

// rename() that never replaces an existing file (EEXIST instead): renameat2 with
// RENAME_NOREPLACE, or link + unlink where the file system does not support it.
int renameNoReplace(const std::string& from, const std::string& to) {
    if (renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) == 0) return 0;
    if (errno != EINVAL && errno != ENOSYS) return -1;
    if (link(from.c_str(), to.c_str()) != 0) return -1;
    unlink(from.c_str());
    return 0;
}

std::mutex g_outMutex;

extern "C" void onStopSignal(int) { g_stop = 1; }

// ---------------------------------------------------------------------------
// stdout line protocol helpers.

// Every byte outside lowest..0x7E becomes '?', so tabs and newlines can never break the
// line protocol.
std::string printable(const std::string& s, unsigned char lowest) {
    std::string out(s);
    for (char& c : out) {
        const unsigned char u = static_cast<unsigned char>(c);
        if (u < lowest || u > 0x7E) c = '?';
    }
    return out;
}

// Fields that come from the network: no spaces either.
std::string clean(const std::string& s) { return printable(s, 0x21); }

// Free text written by us (reasons): spaces kept.
std::string cleanText(const std::string& s) { return printable(s, 0x20); }

// Write one event line atomically (threads share stdout) and flush it.
void emit(const std::vector<std::string>& fields) {
    std::string line;
    for (size_t i = 0; i < fields.size(); ++i) {
        if (i) line += '\t';
        line += fields[i];
    }
    line += '\n';
    std::lock_guard<std::mutex> lock(g_outMutex);
    fwrite(line.data(), 1, line.size(), stdout);
    fflush(stdout);
}

// The AE title as DCMTK hands it over, without padding spaces.
std::string trimmed(const char* s) {
    std::string v(s ? s : "");
    const size_t b = v.find_first_not_of(' ');
    if (b == std::string::npos) return "";
    const size_t e = v.find_last_not_of(' ');
    return v.substr(b, e - b + 1);
}

// Peer address without a ":port" suffix (DCMTK stores the numeric IP when
// reverse lookup is disabled; strip a port defensively for IPv4).
std::string peerIp(const T_ASC_Parameters& params) {
    std::string a(params.DULparams.callingPresentationAddress);
    const size_t colon = a.find(':');
    if (colon != std::string::npos && a.find(':', colon + 1) == std::string::npos)
        a = a.substr(0, colon);
    return a;
}

std::string hex4(unsigned v) {
    char buf[8];
    snprintf(buf, sizeof(buf), "%04X", v & 0xFFFFu);
    return buf;
}

// errno values that mean "the disk/storage failed" -> 0xA700 Out of Resources.
bool isStorageErrno(int e) {
    return e == ENOSPC || e == EIO || e == EDQUOT || e == EROFS || e == EFBIG ||
           e == ENOMEM || e == EMFILE || e == ENFILE;
}

// fsync the incoming directory so a rename into it survives a crash.
int fsyncDir(const std::string& dir) {
    const int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return errno;
    int rc = 0;
    if (fsync(fd) != 0) rc = errno;
    if (close(fd) != 0 && rc == 0) rc = errno;
    return rc;
}

// ---------------------------------------------------------------------------
// The per-association worker SCP.

class KetaSCP : public DcmThreadSCP {
  public:
    KetaSCP() {}

  protected:
    // Called (in the worker thread) when an association request arrives.
    void notifyAssociationRequest(const T_ASC_Parameters& params,
                                  DcmSCPActionType& /* desiredAction */) override {
        // Workers are reused objects in principle: reset all per-association state.
        serial_ = ++g_assocSerial;
        seq_ = 0;
        accepted_ = false;
        rejectPrinted_ = false;
        released_ = false;
        rejectWhy_ = NONE;
        silent_ = false;

        // DcmSCP keeps its association private; negotiateAssociation() below
        // needs the (non-const) parameters of this very request.
        params_ = const_cast<T_ASC_Parameters*>(&params);

        const std::string calling = trimmed(params.DULparams.callingAPTitle);
        const std::string called = trimmed(params.DULparams.calledAPTitle);
        const std::string ip = peerIp(params);
        // A connection closed before its A-ASSOCIATE-RQ reaches here with nothing in it (no
        // AE titles, no presentation contexts): not a request; no line, as pynetdicom's
        // listener records no association for it. DCMTK then refuses it.
        silent_ = calling.empty() && called.empty() &&
                  ASC_countPresentationContexts(const_cast<T_ASC_Parameters*>(&params)) == 0;
        if (!silent_)
            emit({"REQUEST", std::to_string(serial_), clean(calling), clean(called), clean(ip)});

        // Decide now; DcmSCP then asks checkCalledAETitleAccepted() and
        // checkCallingAETitleAccepted(), which refuse with the proper DICOM
        // reject reasons (called / calling AE title not recognized).
        if (called != g_opt.aet) {
            rejectWhy_ = CALLED_AE;
        } else if (!callerAllowed(calling, ip)) {
            rejectWhy_ = CALLING_AE;
        }
    }

    OFBool checkCalledAETitleAccepted(const OFString& /* calledAE */) override {
        if (rejectWhy_ == CALLED_AE) {
            printReject("called AE title");
            return OFFalse;
        }
        return OFTrue;
    }

    OFBool checkCallingAETitleAccepted(const OFString& /* callingAE */) override {
        if (rejectWhy_ == CALLING_AE) {
            printReject("calling AE not allowed");
            return OFFalse;
        }
        return OFTrue;
    }

    // DcmSCPConfig refuses more than 128 presentation contexts in a profile,
    // but a storage node accepts many more abstract syntaxes (the list limit
    // is meant for requestors). So negotiate directly: one call per group of
    // abstract syntaxes sharing a transfer syntax list. Each call accepts the
    // matching proposed contexts (picking the first transfer syntax of our
    // list that the caller proposed) and leaves earlier acceptances alone;
    // contexts accepted by no group end up refused.
    OFCondition negotiateAssociation() override {
        if (params_ == NULL) return DIMSE_ILLEGALASSOCIATION;
        for (const auto& group : g_contextGroups) {
            std::vector<const char*> ts, as;
            for (const std::string& t : group.first) ts.push_back(t.c_str());
            for (const std::string& a : group.second) as.push_back(a.c_str());
            OFCondition c = ASC_acceptContextsWithPreferredTransferSyntaxes(
                params_, as.data(), static_cast<int>(as.size()), ts.data(),
                static_cast<int>(ts.size()));
            if (c.bad()) return c;
        }
        return EC_Normal;
    }

    void notifyAssociationAcknowledge() override {
        accepted_ = true;
        emit({"ACCEPT", std::to_string(serial_)});
    }

    void notifyReleaseRequest() override { released_ = true; }

    void notifyAbortRequest() override { released_ = false; }

    void notifyDIMSEError(const OFCondition& /* cond */) override { released_ = false; }

    void notifyAssociationTermination() override {
        if (accepted_) {
            emit({"END", std::to_string(serial_), released_ ? "released" : "aborted"});
        } else if (!rejectPrinted_) {
            // Refused by DCMTK's own negotiation (application context name,
            // or no acceptable presentation context).
            printReject("negotiation failed (application context or presentation contexts)");
        }
    }

    OFCondition handleIncomingCommand(T_DIMSE_Message* msg,
                                      const DcmPresentationContextInfo& presInfo) override {
        if (msg->CommandField == DIMSE_C_ECHO_RQ &&
            presInfo.abstractSyntax == UID_VerificationSOPClass) {
            return handleECHORequest(msg->msg.CEchoRQ, presInfo.presentationContextID);
        }
        if (msg->CommandField == DIMSE_C_STORE_RQ) {
            return handleStore(msg->msg.CStoreRQ, presInfo);
        }
        return DcmThreadSCP::handleIncomingCommand(msg, presInfo);
    }

  private:
    enum RejectWhy { NONE, CALLED_AE, CALLING_AE };

    void printReject(const std::string& reason) {
        rejectPrinted_ = true;
        if (!silent_) emit({"REJECT", std::to_string(serial_), cleanText(reason)});
    }

    void failed(Uint16 status, const std::string& reason) {
        emit({"FAILED", std::to_string(serial_), hex4(status), cleanText(reason)});
    }

    // Receive one C-STORE straight to a .part file, make it durable, rename
    // it to .dcm, and only then answer Success.
    OFCondition handleStore(T_DIMSE_C_StoreRQ& req, const DcmPresentationContextInfo& presInfo) {
        const T_ASC_PresentationContextID presID = presInfo.presentationContextID;
        ++seq_;
        const std::string stem =
            g_runPrefix + "-" + std::to_string(serial_) + "-" + std::to_string(seq_);
        const std::string part = g_opt.incoming + "/" + stem + ".part";
        const std::string base = stem + ".dcm";
        const std::string final = g_opt.incoming + "/" + base;

        // 1+2. Receive the dataset directly into the file, bit-preserving
        // (DCMTK writes a Part-10 meta header built from the request and the
        // dataset bytes exactly as received).
        errno = 0;
        OFCondition cond = receiveSTORERequest(req, presID, part.c_str());
        if (cond.bad()) {
            // The association is unusable now; DCMTK aborts it after we return.
            // No response is sent; the status in the FAILED line is 0xA700 if
            // errno points at the disk (best effort), otherwise 0xC000.
            const int e = errno;
            unlink(part.c_str());
            failed(isStorageErrno(e) ? STATUS_STORE_Refused_OutOfResources : 0xC000,
                   std::string("receive failed: ") + cond.text());
            released_ = false;
            return cond;
        }

        // 3. fsync the file, rename into place, fsync the directory.
        int err = 0;
        std::string step;
        const int fd = open(part.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            err = errno;
            step = "open";
        } else {
            if (fsync(fd) != 0) {
                err = errno;
                step = "fsync";
            }
            if (close(fd) != 0 && err == 0) {
                err = errno;
                step = "close";
            }
        }
        bool renamed = false;
        if (err == 0) {
            if (renameNoReplace(part, final) != 0) {
                err = errno;
                step = "rename";
            } else {
                renamed = true;
            }
        }
        if (err == 0) {
            err = fsyncDir(g_opt.incoming);
            if (err) step = "fsync directory";
        }

        if (err != 0) {
            // Not durable: remove what we wrote and answer failure; the
            // association itself stays usable.
            unlink(part.c_str());
            if (renamed) unlink(final.c_str());
            const Uint16 status =
                isStorageErrno(err) ? STATUS_STORE_Refused_OutOfResources : 0xC000;
            failed(status, step + ": " + strerror(err));
            return sendSTOREResponse(presID, req, status);
        }

        // 4. Report, then 5. answer Success.
        emit({"STORED", std::to_string(serial_), base, clean(req.AffectedSOPClassUID),
              clean(req.AffectedSOPInstanceUID), clean(presInfo.acceptedTransferSyntax.c_str())});
        return sendSTOREResponse(presID, req, STATUS_Success);
    }

    T_ASC_Parameters* params_ = NULL;
    unsigned long serial_ = 0;
    unsigned long seq_ = 0;
    bool accepted_ = false;
    bool rejectPrinted_ = false;
    bool silent_ = false;  // not a request: a connection closed before its A-ASSOCIATE-RQ
    bool released_ = false;
    RejectWhy rejectWhy_ = NONE;
};

// ---------------------------------------------------------------------------
// --bind support. DCMTK 3.6.7's ASC_initializeNetwork() always binds the
// listening socket to INADDR_ANY and has no parameter for an address. To honour
// --bind ADDR (IPv4), right after DCMTK created its listening socket we find
// that descriptor (the only listening AF_INET socket on our port), bind a
// fresh socket to ADDR:port, and dup2() it onto DCMTK's descriptor number, so
// DCMTK keeps polling/accepting on "its" fd, which now listens on ADDR only.
// Returns 0 or an errno value.

int rebindListenSocket(int port, const std::string& addr) {
    struct in_addr ip;
    if (inet_pton(AF_INET, addr.c_str(), &ip) != 1) return EINVAL;
    if (ip.s_addr == htonl(INADDR_ANY)) return 0;  // DCMTK already listens on all

    // Find DCMTK's listening socket.
    int dcmtkFd = -1;
    DIR* d = opendir("/proc/self/fd");
    if (!d) return errno;
    while (struct dirent* e = readdir(d)) {
        const int fd = atoi(e->d_name);
        if (e->d_name[0] < '0' || e->d_name[0] > '9' || fd == dirfd(d)) continue;
        struct sockaddr_in sa;
        socklen_t len = sizeof(sa);
        int listening = 0;
        socklen_t optlen = sizeof(listening);
        if (getsockname(fd, reinterpret_cast<struct sockaddr*>(&sa), &len) == 0 &&
            sa.sin_family == AF_INET && ntohs(sa.sin_port) == port &&
            getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &optlen) == 0 && listening) {
            dcmtkFd = fd;
            break;
        }
    }
    closedir(d);
    if (dcmtkFd < 0) return ENOTSOCK;

    const int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return errno;
    const int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons(static_cast<uint16_t>(port));
    sa.sin_addr = ip;
    // Free the wildcard port first (a specific address cannot be bound while
    // INADDR_ANY holds the same port), then take it on ADDR.
    close(dcmtkFd);
    int rc = 0;
    if (bind(s, reinterpret_cast<struct sockaddr*>(&sa), sizeof(sa)) != 0 || listen(s, 64) != 0 ||
        dup2(s, dcmtkFd) < 0)
        rc = errno;
    close(s);
    return rc;
}

// ---------------------------------------------------------------------------
// The pool. DcmBaseSCPPool::listen() in 3.6.7 offers no hook to report READY,
// to report pool rejections, or to stop on a signal flag, so listen() is
// re-implemented here with the pool's own protected building blocks
// (runAssociation, rejectAssociation, dropAndDestroyAssociation).

class KetaPool : public DcmSCPPool<KetaSCP> {
  public:
    OFCondition listen() override {
        DcmSCPConfig& cfg = getConfig();
        T_ASC_Network* net = NULL;
        OFCondition cond = ASC_initializeNetwork(NET_ACCEPTOR, static_cast<int>(cfg.getPort()),
                                                 static_cast<int>(cfg.getACSETimeout()), &net);
        if (cond.bad()) return cond;
        const int err = rebindListenSocket(static_cast<int>(cfg.getPort()), g_opt.bind);
        if (err != 0) {
            fprintf(stderr, "ketanode-scp: cannot bind %s:%u: %s\n", g_opt.bind.c_str(),
                    static_cast<unsigned>(cfg.getPort()), strerror(err));
            ASC_dropNetwork(&net);
            return makeOFCondition(OFM_dcmnet, 9001, OF_error, "cannot bind the --bind address");
        }

        const int port = net->acceptorPort ? net->acceptorPort : static_cast<int>(cfg.getPort());
        emit({"READY", std::to_string(port), g_runPrefix});

        // Shared by all workers (presentation contexts, timeouts, AE title).
        DcmSharedSCPConfig shared(cfg);

        // Workers inherit the creating thread's signal mask: block SIGTERM
        // and SIGINT while starting them, so only this thread gets signals.
        sigset_t stopSignals;
        sigemptyset(&stopSignals);
        sigaddset(&stopSignals, SIGTERM);
        sigaddset(&stopSignals, SIGINT);

        while (!g_stop) {
            T_ASC_Association* assoc = NULL;
            // Non-blocking accept with a 1 s timeout, so g_stop is seen quickly.
            cond = ASC_receiveAssociation(net, &assoc, static_cast<long>(cfg.getMaxReceivePDULength()),
                                          NULL, NULL, OFFalse, DUL_NOBLOCK, 1);
            if (cond.good()) {
                if (numThreads(OFTrue) >= getMaxThreads()) {
                    rejectBusy(assoc);
                    continue;
                }
                sigset_t old;
                pthread_sigmask(SIG_BLOCK, &stopSignals, &old);
                cond = runAssociation(assoc, shared);
                pthread_sigmask(SIG_SETMASK, &old, NULL);
                if (cond.bad()) rejectBusy(assoc);  // could not start a worker
            } else if (cond == DUL_NOASSOCIATIONREQUEST) {
                ASC_destroyAssociation(&assoc);  // timeout: look at g_stop again
            } else {
                // Broken connection attempt (e.g. bad A-ASSOCIATE-RQ); keep listening.
                dropAndDestroyAssociation(assoc);
            }
        }

        // Stop accepting: close the listening socket, then let the running
        // associations finish (workers remove themselves when done).
        ASC_dropNetwork(&net);
        while (numThreads(OFTrue) > 0) {
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
        return EC_Normal;
    }

  private:
    // Association limit reached: report and refuse (transient, local limit exceeded).
    void rejectBusy(T_ASC_Association* assoc) {
        const unsigned long serial = ++g_assocSerial;
        const T_ASC_Parameters& p = *assoc->params;
        emit({"REQUEST", std::to_string(serial), clean(trimmed(p.DULparams.callingAPTitle)),
              clean(trimmed(p.DULparams.calledAPTitle)), clean(peerIp(p))});
        emit({"REJECT", std::to_string(serial), "too many associations"});
        rejectAssociation(assoc, ASC_REASON_SP_PRES_LOCALLIMITEXCEEDED);
        dropAndDestroyAssociation(assoc);
    }
};

// ---------------------------------------------------------------------------
// Command line and contexts file.

[[noreturn]] void usage(const std::string& msg) {
    fprintf(stderr, "ketanode-scp: %s\n", msg.c_str());
    fprintf(stderr,
            "usage: ketanode-scp --port P --bind ADDR --aet AET --incoming DIR --contexts FILE\n"
            "                    --max-associations N --acse-timeout S --dimse-timeout S\n"
            "                    --max-pdu BYTES [--allow AE@ADDR]...\n");
    exit(2);
}

unsigned long parseNumber(const std::string& name, const std::string& v, unsigned long lo,
                          unsigned long hi) {
    char* end = NULL;
    errno = 0;
    const unsigned long n = strtoul(v.c_str(), &end, 10);
    if (v.empty() || v[0] == '-' || errno || *end != '\0' || n < lo || n > hi)
        usage("invalid value for " + name + ": " + v);
    return n;
}

void parseArgs(int argc, char** argv) {
    std::set<std::string> seen;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (i + 1 >= argc) usage("missing value for " + a);
        const std::string v = argv[++i];
        if (a != "--allow") seen.insert(a);
        if (a == "--port") g_opt.port = parseNumber(a, v, 1, 65535);
        else if (a == "--bind") g_opt.bind = v;
        else if (a == "--aet") {
            if (v.empty() || v.size() > 16) usage("--aet must be 1..16 characters");
            g_opt.aet = v;
        } else if (a == "--incoming") g_opt.incoming = v;
        else if (a == "--contexts") g_opt.contexts = v;
        else if (a == "--max-associations") g_opt.maxAssociations = parseNumber(a, v, 1, 65535);
        else if (a == "--acse-timeout") g_opt.acseTimeout = parseNumber(a, v, 1, 86400);
        else if (a == "--dimse-timeout") g_opt.dimseTimeout = parseNumber(a, v, 0, 86400);
        else if (a == "--max-pdu") g_opt.maxPdu = parseNumber(a, v, 0, 0xFFFFFFFFul);
        else if (a == "--allow") {
            const size_t at = v.rfind('@');
            if (at == std::string::npos || at == 0 || at + 1 == v.size())
                usage("--allow expects AE@ADDR: " + v);
            g_opt.allow.insert({v.substr(0, at), v.substr(at + 1)});
        } else usage("unknown option " + a);
    }
    for (const char* req : {"--port", "--bind", "--aet", "--incoming", "--contexts",
                            "--max-associations", "--acse-timeout", "--dimse-timeout",
                            "--max-pdu"}) {
        if (!seen.count(req)) usage(std::string("missing ") + req);
    }
}

std::string strip(const std::string& s) {
    const size_t b = s.find_first_not_of(" \t\r\n");
    if (b == std::string::npos) return "";
    return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
}

// "<SOP Class UID>\t<TS UID>,<TS UID>,..." per line; blank lines and lines
// starting with '#' are ignored. Order of transfer syntaxes is kept.
std::map<std::string, std::vector<std::string>> readContexts(const std::string& path) {
    std::ifstream in(path);
    if (!in) usage("cannot read contexts file " + path);
    std::map<std::string, std::vector<std::string>> out;
    std::string line;
    int lineno = 0;
    while (std::getline(in, line)) {
        ++lineno;
        const std::string t = strip(line);
        if (t.empty() || t[0] == '#') continue;
        const size_t tab = line.find('\t');
        if (tab == std::string::npos)
            usage("contexts file line " + std::to_string(lineno) + ": no tab");
        const std::string sop = strip(line.substr(0, tab));
        std::vector<std::string>& ts = out[sop];
        std::stringstream rest(line.substr(tab + 1));
        std::string one;
        while (std::getline(rest, one, ',')) {
            one = strip(one);
            if (!one.empty() && std::find(ts.begin(), ts.end(), one) == ts.end()) ts.push_back(one);
        }
        if (sop.empty() || ts.empty())
            usage("contexts file line " + std::to_string(lineno) + ": empty UID list");
    }
    return out;
}

}  // namespace

int main(int argc, char** argv) {
    parseArgs(argc, argv);
    {
        timespec now{};
        clock_gettime(CLOCK_REALTIME, &now);
        g_runPrefix = std::to_string(static_cast<long>(getpid())) + "-" +
                      std::to_string(static_cast<long long>(now.tv_sec) * 1000000000LL + now.tv_nsec);
    }

    // DCMTK's logger: WARN and above, to stderr (never dataset contents).
    OFLog::configure(OFLogger::WARN_LOG_LEVEL);

    struct stat st;
    if (stat(g_opt.incoming.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
        usage("--incoming is not a directory: " + g_opt.incoming);

    // DCMTK 3.6.7 listens on IPv4 only: --bind must be an IPv4 address.
    struct in_addr bindIp;
    if (inet_pton(AF_INET, g_opt.bind.c_str(), &bindIp) != 1)
        usage("--bind must be an IPv4 address (e.g. 127.0.0.1 or 0.0.0.0): " + g_opt.bind);

    // Numeric peer addresses (the allow-list matches IPs; no reverse DNS delay).
    dcmDisableGethostbyaddr.set(OFTrue);
    // Keep received data exactly as sent.
    dcmEnableAutomaticInputDataCorrection.set(OFFalse);
    if (!dcmDataDict.isDictionaryLoaded())
        fprintf(stderr, "ketanode-scp: warning: no DICOM data dictionary loaded\n");

    // Stop on SIGTERM/SIGINT (handler only sets a flag); never die of SIGPIPE.
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = onStopSignal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    KetaPool pool;
    pool.setMaxThreads(static_cast<Uint16>(g_opt.maxAssociations));
    DcmSCPConfig& cfg = pool.getConfig();
    cfg.setPort(static_cast<Uint16>(g_opt.port));
    cfg.setAETitle(g_opt.aet.c_str());
    cfg.setRespondWithCalledAETitle(OFFalse);
    cfg.setACSETimeout(static_cast<Uint32>(g_opt.acseTimeout));
    if (g_opt.dimseTimeout > 0) {
        cfg.setDIMSEBlockingMode(DIMSE_NONBLOCKING);
        cfg.setDIMSETimeout(static_cast<Uint32>(g_opt.dimseTimeout));
    } else {
        cfg.setDIMSEBlockingMode(DIMSE_BLOCKING);  // 0 = no DIMSE timeout
    }
    // DCMTK handles receive PDUs of 4096..131072 bytes only: clamp. 0 (DICOM's
    // "no limit") becomes the largest size DCMTK accepts.
    unsigned long pdu = g_opt.maxPdu == 0 ? ASC_MAXIMUMPDUSIZE : g_opt.maxPdu;
    if (pdu < ASC_MINIMUMPDUSIZE) pdu = ASC_MINIMUMPDUSIZE;
    if (pdu > ASC_MAXIMUMPDUSIZE) pdu = ASC_MAXIMUMPDUSIZE;
    if (pdu != g_opt.maxPdu && g_opt.maxPdu != 0)
        fprintf(stderr, "ketanode-scp: warning: --max-pdu %lu clamped to %lu\n", g_opt.maxPdu, pdu);
    cfg.setMaxReceivePDULength(static_cast<Uint32>(pdu));
    // Used by DCMTK's own listen loop only; ours always polls every second.
    cfg.setConnectionBlockingMode(DUL_NOBLOCK);
    cfg.setConnectionTimeout(1);
    cfg.setHostLookupEnabled(OFFalse);

    // Presentation contexts: exactly the configured ones, plus Verification.
    std::map<std::string, std::vector<std::string>> contexts = readContexts(g_opt.contexts);
    std::vector<std::string>& verif = contexts[UID_VerificationSOPClass];
    for (const char* ts : {UID_LittleEndianImplicitTransferSyntax,
                           UID_LittleEndianExplicitTransferSyntax}) {
        if (std::find(verif.begin(), verif.end(), ts) == verif.end()) verif.push_back(ts);
    }
    std::map<std::vector<std::string>, std::vector<std::string>> byTransferSyntaxes;
    for (const auto& kv : contexts) byTransferSyntaxes[kv.second].push_back(kv.first);
    for (const auto& kv : byTransferSyntaxes) g_contextGroups.emplace_back(kv.first, kv.second);
    // The pool's configuration must hold a valid profile although our
    // negotiateAssociation() does the work: give it Verification.
    OFList<OFString> verificationTs;
    for (const std::string& t : verif) verificationTs.push_back(t.c_str());
    OFCondition c = cfg.addPresentationContext(UID_VerificationSOPClass, verificationTs);
    if (c.bad()) usage(std::string("cannot add the Verification context: ") + c.text());

    OFCondition cond = pool.listen();
    fflush(stdout);
    if (cond.bad()) {
        fprintf(stderr, "ketanode-scp: cannot listen on port %lu: %s\n", g_opt.port, cond.text());
        _exit(1);
    }
    // All associations have finished; skip static destructors (a worker
    // thread may still be unwinding its last few instructions).
    _exit(0);
}
